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

from slack_sdk.errors import SlackApiError
from sqlalchemy import delete, select

from bot import audit
from bot.audit import Actor
from bot.engine.context import run_url
from bot.engine.intake import check_required, params_with_defaults
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


# Slack's clients (and the text people paste) turn "quotes" into typographic ones, which shlex would read as
# part of a word. Single ones are left alone: U+2019 is also an apostrophe.
_TYPOGRAPHIC_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"'})


def split_words(text: str) -> list[str]:
    try:
        return shlex.split(text.translate(_TYPOGRAPHIC_QUOTES))
    except ValueError as exc:
        plain = text.split()
        # A secret typed into the command may well hold a quote: it must be told it is exposed (by the
        # subcommand, which refuses every extra word), not asked to fix the quotes and type it again.
        if [word.lower() for word in plain[:2]] == ["secret", "set"] or plain[:1] == ["connect"]:
            return plain
        raise UserError(messages.UNREADABLE_COMMAND.format(problem=exc)) from None


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
        key = key.strip()
        if not equals or not key:
            raise UserError(messages.BAD_ARGUMENT.format(text=messages.escape(word), command=command.name, sub=sub,
                                                         workflow=workflow))
        if key in pairs:
            raise UserError(messages.DUPLICATE_ARGUMENT.format(key=messages.escape(key)))
        pairs[key] = value
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
    """Enable a workflow here, or change the parameters of the subscription already here: parameters left out
    keep their values, and `key=` (empty) drops one back to the workflow's default."""
    workflow = find_workflow(services, command, words, "enable")
    await require_admin(services, command, "enable workflows")
    _require_a_channel(command, "enable")
    given = parse_pairs(command, "enable", workflow.name, words[1:])
    cleared = {key for key, value in given.items() if value == "" and key in workflow.model.params}
    changes = check_params(workflow, {key: value for key, value in given.items() if key not in cleared}, strict=True)
    now = datetime.now(UTC)
    async with services.db.write() as session:
        subscription = (await session.execute(select(Subscription).where(
            Subscription.team_id == command.team_id, Subscription.channel_id == command.channel_id,
            Subscription.workflow == workflow.name))).scalar_one_or_none()
        before = dict(subscription.params) if subscription is not None else None
        params = {key: value for key, value in {**(before or {}), **changes}.items() if key not in cleared}
        check_required(workflow, params_with_defaults(workflow, params))
        if subscription is None:
            session.add(Subscription(team_id=command.team_id, channel_id=command.channel_id, workflow=workflow.name,
                                     params=params, created_by=command.user_id, created_at=now))
        elif params != before:
            subscription.params = params
        if params != before:
            await audit.append(session, team_id=command.team_id, actor=command.actor,
                               action="subscription.updated" if before is not None else "subscription.enabled",
                               workflow=workflow.name, workflow_hash=workflow.hash, outcome="ok",
                               details={"channel": command.channel_id, "params": params}, at=now)
    lines = [messages.enabled(workflow=workflow.name, params=params, before=before)]
    if not await _bot_in_channel(services, command):
        lines.append(messages.NOT_IN_CHANNEL)
    for trigger in workflow.triggers:
        integration = INTEGRATIONS.get(trigger)
        if integration is None or not integration.receives_webhooks:
            continue
        lines.append(await _connection_reply(services, command, trigger, rotate=False))
    return "\n\n".join(lines)


def _require_a_channel(command: Command, sub: str) -> None:
    """Runs belong to channels: a direct message (`D…`) has no members relaybot can see to let approve."""
    if command.channel_id.startswith("D"):
        raise UserError(messages.NOT_IN_A_DM.format(command=command.name, sub=sub))


async def _bot_in_channel(services: Services, command: Command) -> bool:
    """False only when Slack says the bot is not a member, or cannot see the channel at all (a private channel
    or another people's conversation); a question Slack did not answer is not taken for a no."""
    try:
        info = await services.slack.call(command.team_id, "conversations.info", channel=command.channel_id)
    except SlackApiError as exc:
        return exc.response.get("error") != "channel_not_found"
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
            # A workflow that left the catalog may still be enabled here (and can be disabled): look only now.
            known = services.catalog.get(workflow_name) is not None
            text = messages.NOT_ENABLED if known else messages.NOT_ENABLED_UNKNOWN
            raise UserError(text.format(workflow=messages.escape(workflow_name), command=command.name))
        await audit.append(session, team_id=command.team_id, actor=command.actor, action="subscription.disabled",
                           workflow=workflow_name, outcome="ok", details={"channel": command.channel_id})
    return messages.DISABLED.format(workflow=messages.escape(workflow_name))


async def cmd_run(services: Services, command: Command, words: list[str]) -> str:
    workflow = find_workflow(services, command, words, "run")
    if workflow.model.run_by == "admins":
        await require_admin(services, command, f"start `{workflow.name}` by hand")
    arguments = parse_pairs(command, "run", workflow.name, words[1:])
    event_data = check_params(workflow, arguments, strict=False)
    _require_a_channel(command, "run")
    if not await _bot_in_channel(services, command):
        # The run would go ahead with nobody seeing its card, its approvals or its thread.
        raise UserError(messages.RUN_NOT_IN_CHANNEL.format(workflow=workflow.name))
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
        if not rotate:
            hint = integration_class().setup_hint(url=url, secret=messages.SECRET_SHOWN_BEFORE)
            if integration_class.secret_generated_by_tool:
                return messages.connection_tool_secret(integration=integration, url=url, hint=hint,
                                                       command=command.name, new=False)
            return messages.connection_existing(integration=integration, url=url, hint=hint, command=command.name)
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
    hint = integration_class().setup_hint(url=url, secret=messages.SECRET_SHOWN_ABOVE)
    if integration_class.secret_generated_by_tool:
        # The secret generated here is never shown: until the tool's own is pasted in, nothing verifies.
        return messages.connection_tool_secret(integration=integration, url=url, command=command.name, new=True,
                                               hint=hint)
    return messages.connection_created(integration=integration, url=url, secret=secret, hint=hint,
                                       command=command.name)


async def cmd_connect(services: Services, command: Command, words: list[str]) -> str:
    webhook_integrations = sorted(name for name, cls in INTEGRATIONS.items() if cls.receives_webhooks)
    if not words:
        raise UserError(messages.NEED_INTEGRATION.format(
            command=command.name, known=", ".join(f"`{name}`" for name in webhook_integrations)))
    name = words[0].lower()
    if name not in INTEGRATIONS:
        raise NotFound(messages.UNKNOWN_INTEGRATION.format(name=messages.escape(name),
                                                           known=", ".join(webhook_integrations)))
    option = words[1].lower() if len(words) > 1 else None
    # Wrong words are answered before the admin check: whoever pasted a secret here must hear it is exposed.
    if option == "set-secret" and words[2:]:
        raise UserError(messages.CONNECTION_SET_SECRET_EXTRA.format(command=command.name, name=name))
    if option not in (None, "rotate", "set-secret"):
        raise UserError(messages.CONNECT_EXTRA.format(command=command.name, name=name))
    if option == "rotate" and words[2:]:
        raise UserError(messages.CONNECT_ROTATE_EXTRA.format(command=command.name, name=name))
    await require_admin(services, command, "manage connections")
    if option == "set-secret":
        return await secret_commands.open_connection_secret_form(services, command, name)
    return await _connection_reply(services, command, name, rotate=option == "rotate")


async def cmd_runs(services: Services, command: Command, words: list[str]) -> str:
    async with services.db.read() as session:
        query = (select(Run).where(Run.team_id == command.team_id, Run.channel_id == command.channel_id)
                 .order_by(Run.created_at.desc()).limit(10))
        if words:
            query = query.where(Run.workflow == words[0])
        runs = list((await session.execute(query)).scalars())
    if not runs:
        if words and services.catalog.get(words[0]) is None:
            raise NotFound(messages.UNKNOWN_WORKFLOW.format(name=messages.escape(words[0]), command=command.name))
        return messages.NO_RUNS if not words else messages.NO_RUNS_OF.format(workflow=messages.escape(words[0]))
    return messages.run_list([messages.run_line(run_id=run.id, state=run.state, workflow=run.workflow,
                                                summary=run.card.get("summary") or run.title,
                                                created_at=run.created_at, url=run_url(run)) for run in runs])


async def find_run(services: Services, command: Command, words: list[str], sub: str) -> Run:
    """The run a command names, in the command's workspace, and in a channel the person is in (admins: any):
    a private channel's runs are not for the rest of the workspace, as on the Home tab."""
    if not words:
        raise UserError(messages.NEED_RUN.format(command=command.name, sub=sub))
    async with services.db.read() as session:
        run = (await session.execute(select(Run).where(Run.id == normalize_run_id(words[0]),
                                                       Run.team_id == command.team_id))).scalar_one_or_none()
    if run is not None and run.channel_id != command.channel_id:
        try:
            visible = (await services.people.in_channel(command.team_id, command.user_id, run.channel_id)
                       or await services.people.is_admin(command.team_id, command.user_id))
        except LookupFailed as exc:
            raise NotAllowed(messages.RUN_LOOKUP_FAILED.format(error=exc)) from None
        if not visible:
            run = None  # said as if there were none: whether it exists is the channel's business too
    if run is None:
        raise NotFound(messages.UNKNOWN_RUN.format(run_id=messages.escape(words[0])))
    return run


async def cmd_status(services: Services, command: Command, words: list[str]) -> str:
    run = await find_run(services, command, words, "status")
    async with services.db.read() as session:
        steps = list((await session.execute(select(Step).where(Step.run_id == run.id).order_by(Step.position)))
                     .scalars())

    return messages.run_status(run_id=run.id, workflow=run.workflow, channel_id=run.channel_id, state=run.state,
                               summary=run.card.get("summary") or run.title, step_lines=step_lines(steps))


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
        raise NotAllowed(messages.CANCEL_NOT_ALLOWED.format(workflow=run.workflow))
    from bot.slack.lifecycle import cancel_run

    if not await cancel_run(services, run_id=run.id, team_id=command.team_id, actor=command.actor,
                            reason=f"cancelled with {command.name} cancel"):
        return messages.CANCEL_ALREADY_ENDED.format(run_id=run.id, state=run.state)
    return messages.CANCELLED.format(run_id=run.id)


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
