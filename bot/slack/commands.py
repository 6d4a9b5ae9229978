"""`/relay …`: the slash command. The listener acks at once; the reply follows as an ephemeral message.

Each subcommand is a function `(services, command) -> reply text` that raises `UserError` to refuse.
"""

from __future__ import annotations

import shlex
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select

from bot import audit
from bot.audit import Actor
from bot.engine.context import run_url
from bot.engine.loader import CompiledWorkflow
from bot.engine.triggers.status import trigger_statuses
from bot.errors import NotAllowed, NotFound, UserError
from bot.ids import new_connection_id, new_webhook_secret, normalize_run_id
from bot.services import Services
from bot.slack import messages
from bot.slack import secrets as secret_commands
from bot.slack.blocks import step_lines
from bot.slack.people import LookupFailed
from bot.store.inbox import NewEvent
from bot.store.models import Connection, Run, Step, Subscription, Workspace
from integrations.registry import INTEGRATIONS


@dataclass
class Command:
    team_id: str
    team_domain: str | None
    channel_id: str
    user_id: str
    user_name: str | None
    text: str
    trigger_id: str | None
    name: str

    @classmethod
    def from_body(cls, body: dict[str, Any], name: str) -> Command:
        return cls(team_id=body["team_id"], team_domain=body.get("team_domain"), channel_id=body["channel_id"],
                   user_id=body["user_id"], user_name=body.get("user_name"), text=body.get("text") or "",
                   trigger_id=body.get("trigger_id"), name=body.get("command") or name)

    @property
    def actor(self) -> Actor:
        return Actor(self.user_id, self.user_name)


Handler = Callable[[Services, Command, list[str]], Awaitable[str]]


def split_words(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise UserError(f"I could not read that command: {exc} (check the quotes).") from None


async def ensure_workspace(services: Services, team_id: str, name: str | None) -> None:
    async with services.db.read() as session:
        if await session.get(Workspace, team_id) is not None:
            return
    async with services.db.write() as session:
        if await session.get(Workspace, team_id) is None:
            session.add(Workspace(team_id=team_id, name=name, installed_at=datetime.now(UTC),
                                  uninstalled_at=None))


async def require_admin(services: Services, command: Command, what: str) -> None:
    if not await services.people.is_admin(command.team_id, command.user_id):
        raise NotAllowed(messages.NOT_ADMIN.format(what=what))


def find_workflow(services: Services, command: Command, words: list[str], sub: str) -> CompiledWorkflow:
    if not words:
        raise UserError(messages.NEED_WORKFLOW.format(command=command.name, sub=sub))
    workflow = services.catalog.get(words[0])
    if workflow is None:
        raise NotFound(messages.UNKNOWN_WORKFLOW.format(name=messages.escape(words[0]), command=command.name))
    return workflow


def parse_pairs(command: Command, sub: str, workflow: str, words: list[str]) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for word in words:
        key, equals, value = word.partition("=")
        if not equals or not key.strip():
            raise UserError(messages.BAD_ARGUMENT.format(text=messages.escape(word), command=command.name, sub=sub,
                                                         workflow=workflow))
        pairs[key.strip()] = value
    return pairs


def check_params(workflow: CompiledWorkflow, given: dict[str, str], *, strict: bool) -> dict[str, Any]:
    """Coerce the values of declared parameters to their choices' types; refuse unknown ones if `strict`."""
    declared = workflow.model.params
    result: dict[str, Any] = {}
    for key, value in given.items():
        spec = declared.get(key)
        if spec is None:
            if strict:
                if not declared:
                    raise UserError(messages.NO_PARAMS.format(workflow=workflow.name))
                known = ", ".join(f"`{name}`" for name in declared)
                raise UserError(messages.UNKNOWN_PARAM.format(workflow=workflow.name, key=messages.escape(key),
                                                              known=known))
            result[key] = value
            continue
        if spec.choices is not None:
            match = next((choice for choice in spec.choices if str(choice) == value), None)
            if match is None:
                choices = ", ".join(f"`{choice}`" for choice in spec.choices)
                raise UserError(messages.BAD_CHOICE.format(key=messages.escape(key), value=messages.escape(value),
                                                           workflow=workflow.name, choices=choices))
            result[key] = match
        else:
            result[key] = value
    if strict:
        for key, spec in declared.items():
            if spec.required and spec.default is None and key not in result:
                raise UserError(messages.MISSING_PARAM.format(workflow=workflow.name, key=key,
                                                              description=spec.description or "required"))
    return result


def connection_url(services: Services, connection_id: str) -> str:
    return f"{services.settings.public_url}/hooks/{connection_id}"


async def create_connection(services: Services, command: Command, integration: str) -> tuple[Connection, str]:
    """A new connection with a new secret; the secret is returned this once."""
    secret = new_webhook_secret()
    now = datetime.now(UTC)
    async with services.db.write() as session:
        existing = (await session.execute(select(Connection).where(
            Connection.team_id == command.team_id, Connection.integration == integration))).scalar_one_or_none()
        if existing is not None:
            raise _AlreadyConnected(existing.id)
        sealed = await services.keyring.seal(session, team_id=command.team_id, purpose=f"connection:{integration}",
                                             plaintext=secret.encode())
        connection = Connection(id=new_connection_id(), team_id=command.team_id, integration=integration,
                                secret_ciphertext=sealed, created_by=command.user_id, created_at=now,
                                rotated_at=None)
        session.add(connection)
        await audit.append(session, team_id=command.team_id, actor=command.actor, action="connection.created",
                           outcome="ok", details={"integration": integration, "connection": connection.id}, at=now)
    return connection, secret


class _AlreadyConnected(Exception):
    def __init__(self, connection_id: str) -> None:
        self.connection_id = connection_id


# -------------------------------------------------------------------------------------------- subcommands


async def cmd_help(services: Services, command: Command, words: list[str]) -> str:
    return messages.help_text(command.name)


async def cmd_list(services: Services, command: Command, words: list[str]) -> str:
    if not len(services.catalog):
        return messages.EMPTY_CATALOG
    async with services.db.read() as session:
        enabled = set((await session.execute(select(Subscription.workflow).where(
            Subscription.team_id == command.team_id, Subscription.channel_id == command.channel_id))).scalars())
    statuses = await trigger_statuses(services.db, team_id=command.team_id, channel_id=command.channel_id)
    lines = [messages.catalog_line(name=workflow.name, title=workflow.title, description=workflow.model.description,
                                   triggers=list(dict.fromkeys([*workflow.triggers, "command"])),
                                   enabled_here=workflow.name in enabled)
             + (f"\n      {statuses[workflow.name]}" if workflow.name in statuses else "")
             for workflow in services.catalog]
    return "\n".join([*lines, "", messages.LIST_FOOTER.format(command=command.name)])


async def cmd_enable(services: Services, command: Command, words: list[str]) -> str:
    workflow = find_workflow(services, command, words, "enable")
    await require_admin(services, command, "enable workflows")
    params = check_params(workflow, parse_pairs(command, "enable", workflow.name, words[1:]), strict=True)
    now = datetime.now(UTC)
    async with services.db.write() as session:
        subscription = (await session.execute(select(Subscription).where(
            Subscription.team_id == command.team_id, Subscription.channel_id == command.channel_id,
            Subscription.workflow == workflow.name))).scalar_one_or_none()
        updated = subscription is not None
        if subscription is None:
            session.add(Subscription(team_id=command.team_id, channel_id=command.channel_id, workflow=workflow.name,
                                     params=params, created_by=command.user_id, created_at=now))
        else:
            subscription.params = params
        await audit.append(session, team_id=command.team_id, actor=command.actor,
                           action="subscription.updated" if updated else "subscription.enabled",
                           workflow=workflow.name, workflow_hash=workflow.hash, outcome="ok",
                           details={"channel": command.channel_id, "params": params}, at=now)
    lines = [messages.enabled(workflow=workflow.name, params=params, updated=updated)]
    if not await _bot_in_channel(services, command):
        lines.append(messages.NOT_IN_CHANNEL)
    for trigger in workflow.triggers:
        integration = INTEGRATIONS.get(trigger)
        if integration is None or not integration.receives_webhooks:
            continue
        lines.append(await _connection_reply(services, command, trigger, rotate=False))
    return "\n\n".join(lines)


async def _bot_in_channel(services: Services, command: Command) -> bool:
    """False only when Slack says the bot is not a member; an unanswered question is not a warning."""
    try:
        info = await services.slack.call(command.team_id, "conversations.info", channel=command.channel_id)
    except Exception:
        return True
    channel = info.get("channel") or {}
    return bool(channel.get("is_member", True)) or bool(channel.get("is_im"))


async def cmd_disable(services: Services, command: Command, words: list[str]) -> str:
    workflow_name = words[0] if words else ""
    if not workflow_name:
        raise UserError(messages.NEED_WORKFLOW.format(command=command.name, sub="disable"))
    await require_admin(services, command, "disable workflows")
    async with services.db.write() as session:
        result = await session.execute(delete(Subscription).where(
            Subscription.team_id == command.team_id, Subscription.channel_id == command.channel_id,
            Subscription.workflow == workflow_name))
        if not result.rowcount:  # type: ignore[attr-defined]
            raise UserError(messages.NOT_ENABLED.format(workflow=messages.escape(workflow_name)))
        await audit.append(session, team_id=command.team_id, actor=command.actor, action="subscription.disabled",
                           workflow=workflow_name, outcome="ok", details={"channel": command.channel_id})
    return messages.DISABLED.format(workflow=messages.escape(workflow_name))


async def cmd_run(services: Services, command: Command, words: list[str]) -> str:
    workflow = find_workflow(services, command, words, "run")
    if workflow.model.run_by == "admins":
        await require_admin(services, command, f"start `{workflow.name}` by hand")
    arguments = parse_pairs(command, "run", workflow.name, words[1:])
    event_data = check_params(workflow, arguments, strict=False)
    delivery = command.trigger_id or uuid.uuid4().hex
    run_id = await services.intake.start_now(NewEvent(
        team_id=command.team_id, source="command", delivery_id=f"command:{delivery}", kind="command",
        payload=event_data, received_at=datetime.now(UTC),
        summary=f"{command.name} run by {command.user_name or command.user_id}",
        headers={"user_name": command.user_name or ""}, event_name="command", target_workflow=workflow.name,
        target_channel=command.channel_id, started_by=command.user_id))
    services.wake()
    return messages.RUN_STARTED.format(run_id=run_id, workflow=workflow.name)


async def _connection_reply(services: Services, command: Command, integration: str, *, rotate: bool) -> str:
    integration_class = INTEGRATIONS[integration]
    try:
        connection, secret = await create_connection(services, command, integration)
    except _AlreadyConnected as existing:
        connection_id = existing.connection_id
        url = connection_url(services, connection_id)
        hint = integration_class().setup_hint(url=url)
        if not rotate:
            if integration_class.secret_generated_by_tool:
                return messages.connection_tool_secret(integration=integration, url=url, hint=hint,
                                                       command=command.name, new=False)
            return messages.connection_existing(integration=integration, url=url, hint=hint)
        if integration_class.secret_generated_by_tool:
            raise UserError(messages.TOOL_SECRET_NO_ROTATE.format(integration=integration,
                                                                  command=command.name)) from None
        secret = new_webhook_secret()
        async with services.db.write() as session:
            row = await session.get(Connection, connection_id)
            assert row is not None
            row.secret_ciphertext = await services.keyring.seal(session, team_id=command.team_id,
                                                                purpose=f"connection:{integration}",
                                                                plaintext=secret.encode())
            row.rotated_at = datetime.now(UTC)
            await audit.append(session, team_id=command.team_id, actor=command.actor, action="connection.rotated",
                               outcome="ok", details={"integration": integration, "connection": connection_id})
        services.forget_connection(connection_id)
        return messages.connection_rotated(integration=integration, url=url, secret=secret)
    url = connection_url(services, connection.id)
    if integration_class.secret_generated_by_tool:
        # The secret generated here is never shown: until the tool's own is pasted in, nothing verifies.
        return messages.connection_tool_secret(integration=integration, url=url, command=command.name, new=True,
                                               hint=integration_class().setup_hint(url=url))
    return messages.connection_created(integration=integration, url=url, secret=secret,
                                       hint=integration_class().setup_hint(url=url))


async def cmd_connect(services: Services, command: Command, words: list[str]) -> str:
    webhook_integrations = sorted(name for name, cls in INTEGRATIONS.items() if cls.receives_webhooks)
    if not words:
        raise UserError(f"Which integration? `{command.name} connect <integration>` — one of "
                        + ", ".join(f"`{name}`" for name in webhook_integrations) + ".")
    name = words[0].lower()
    if name not in INTEGRATIONS:
        raise NotFound(messages.UNKNOWN_INTEGRATION.format(name=messages.escape(name),
                                                           known=", ".join(webhook_integrations)))
    await require_admin(services, command, "manage connections")
    option = words[1].lower() if len(words) > 1 else None
    if option == "set-secret":
        return await secret_commands.open_connection_secret_form(services, command, name, words[2:])
    if option not in (None, "rotate"):
        raise UserError(f"`{command.name} connect {name}` takes nothing more, `rotate` or `set-secret`.")
    return await _connection_reply(services, command, name, rotate=option == "rotate")


async def cmd_runs(services: Services, command: Command, words: list[str]) -> str:
    async with services.db.read() as session:
        query = (select(Run).where(Run.team_id == command.team_id, Run.channel_id == command.channel_id)
                 .order_by(Run.created_at.desc()).limit(10))
        if words:
            query = query.where(Run.workflow == words[0])
        runs = list((await session.execute(query)).scalars())
    if not runs:
        return "No runs in this channel yet." if not words else f"No runs of `{messages.escape(words[0])}` here yet."

    lines = [f"`{run.id}` {messages.STATUS_TEXT.get(run.state, run.state)} · `{run.workflow}` · "
             f"{messages.escape(run.card.get('summary') or run.title)} · "
             f"{messages.slack_date(run.created_at)} · "
             f"<{run_url(run)}|thread>" for run in runs]
    return "*Latest runs here*\n" + "\n".join(lines)


async def find_run(services: Services, command: Command, words: list[str], sub: str) -> Run:
    """The run a command names, in the command's workspace only."""
    if not words:
        raise UserError(f"Which run? `{command.name} {sub} <run id>` — `{command.name} runs` lists them.")
    async with services.db.read() as session:
        run = (await session.execute(select(Run).where(Run.id == normalize_run_id(words[0]),
                                                       Run.team_id == command.team_id))).scalar_one_or_none()
    if run is None:
        raise NotFound(f"There is no run `{messages.escape(words[0])}` in this workspace.")
    return run


async def cmd_status(services: Services, command: Command, words: list[str]) -> str:
    run = await find_run(services, command, words, "status")
    async with services.db.read() as session:
        steps = list((await session.execute(select(Step).where(Step.run_id == run.id).order_by(Step.position)))
                     .scalars())

    lines = [f"*Run `{run.id}`* of `{run.workflow}` in <#{run.channel_id}>: "
             f"{messages.STATUS_TEXT.get(run.state, run.state)}",
             messages.escape(run.card.get("summary") or run.title)]
    lines += step_lines(steps)
    return "\n".join(lines)


async def may_cancel(services: Services, command: Command, run: Run) -> bool:
    """Admins, and the approvers of the run's workflow (anyone, when it names no approvers)."""
    if await services.people.is_admin(command.team_id, command.user_id):
        return True
    from bot.slack.actions import workflow_of

    workflow = await workflow_of(services, run)
    approver_sets = [step.approvers for step in workflow.steps if step.needs_approval]
    if workflow.model.approvers is not None:
        approver_sets.append(workflow.model.approvers)
    if not approver_sets or any(approvers is None or approvers.anyone for approvers in approver_sets):
        return True
    for approvers in approver_sets:
        assert approvers is not None
        if command.user_id in approvers.users:
            return True
        for group in approvers.groups:
            try:
                if command.user_id in await services.people.group_members(command.team_id, group, fresh=True):
                    return True
            except LookupFailed:
                continue
    return False


async def cmd_cancel(services: Services, command: Command, words: list[str]) -> str:
    run = await find_run(services, command, words, "cancel")
    if not await may_cancel(services, command, run):
        raise NotAllowed(f"Only admins and the approvers of `{run.workflow}` can cancel its runs.")
    from bot.slack.lifecycle import cancel_run

    if not await cancel_run(services, run_id=run.id, team_id=command.team_id, actor=command.actor,
                            reason="cancelled with /relay cancel"):
        return f"Run `{run.id}` has already ended ({run.state}); nothing to cancel."
    return f"Run `{run.id}` is cancelled. A step already running finishes; nothing else will run."


SUBCOMMANDS: dict[str, Handler] = {
    "help": cmd_help, "list": cmd_list, "enable": cmd_enable, "disable": cmd_disable, "run": cmd_run,
    "connect": cmd_connect, "runs": cmd_runs, "status": cmd_status, "cancel": cmd_cancel,
    "secret": secret_commands.cmd_secret,
}


async def dispatch(services: Services, command: Command) -> str:
    words = split_words(command.text)
    if not words:
        return await cmd_help(services, command, [])
    handler = SUBCOMMANDS.get(words[0].lower())
    if handler is None:
        raise UserError(messages.UNKNOWN_SUBCOMMAND.format(command=command.name, word=messages.escape(words[0])))
    await ensure_workspace(services, command.team_id, command.team_domain)
    return await handler(services, command, words[1:])
