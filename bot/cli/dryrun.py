"""`relaybot test <workflow> --event FILE …`: one workflow against one event, without Slack and without a server.

Everything real but the world around it: a temporary SQLite database, the Slack emulator in this process as
Slack, the real bot (`create_app`) on a loopback port, outbound HTTP real or answered from `--mock` files. The
event arrives through the door it would use in production (a signed webhook, `/relay run`, or the inbox for
poll and schedule triggers); waiting steps are decided by clicking the card's buttons, so approvals take the
same code path as a person's click. It prints the run's thread and final card; the exit status is 0 when the
run succeeded (steps left unapproved count as skipped), 1 when it did not, 2 when the input is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from bot.cli.common import EXIT_CONFIG
from bot.errors import WorkflowError
from bot.settings import Settings

EXIT_RUN_FAILED = 1
TEAM_ID = "T0DRYRUN01"
CHANNEL_ID = "C0DRYRUN01"
TESTER = "U0TESTER01"
APPROVER = "U0APPROVER"


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "test", help="dry-run one workflow against one event, without Slack; prints the audit trail",
        description="Run one workflow against one event with a local Slack emulator and a temporary database. "
                    "Exit status 0 when the run succeeded (steps left unapproved count as skipped), 1 when it "
                    "failed or started no run, 2 when the workflow or the arguments are wrong (the bot "
                    "refused the parameters or the event included).")
    parser.add_argument("workflow", help="a workflow name from the workflows directory, or a workflow file")
    parser.add_argument("--event", required=True, type=Path, metavar="FILE",
                        help="the event body as the tool sends it (JSON); integrations/examples/ has some")
    parser.add_argument("--kind", help="the event's kind: for GitHub <X-GitHub-Event>[.<action>]; `command` "
                                       "starts the run with /relay run (the file then holds its key=value "
                                       "arguments as a JSON object); `schedule` or `poll` fires that trigger")
    parser.add_argument("--source", help="which of the workflow's triggers the event comes through (default: the "
                                         "one --kind names, else, with --kind, the first that receives webhooks, "
                                         "else the first)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a parameter of the subscription, as `/relay enable` takes it (repeatable)")
    parser.add_argument("--approve", nargs="+", action="extend", metavar="all|none|STEP",
                        help="which waiting steps to approve; the others are skipped (default: none)")
    parser.add_argument("--secret", action="append", default=[], metavar="NAME=VALUE",
                        help="a secret the workflow uses, stored encrypted as `/relay secret set` does "
                             "(repeatable)")
    parser.add_argument("--mock", action="append", default=[], metavar="[METHOD ]URL=FILE",
                        help="answer requests to URL with FILE's content (URL=STATUS:FILE for another status; "
                             "a trailing * matches by prefix); other requests go out for real (repeatable)")
    parser.add_argument("--offline", action="store_true",
                        help="refuse every outbound request no --mock answers (the step fails)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for the run to finish (default: 120)")
    parser.add_argument("--verbose", action="store_true", help="show the bot's log")
    parser.set_defaults(handler=run)


# ---------------------------------------------------------------------------------------------- the plan


class InputProblem(Exception):
    """The arguments or files are wrong: exit status 2, and this message."""


@dataclass
class Approvals:
    everything: bool = False
    steps: set[str] = field(default_factory=set)

    @classmethod
    def parse(cls, words: list[str] | None, step_ids: list[str], waiting_ids: list[str]) -> Approvals:
        words = words or ["none"]
        if words == ["all"]:
            return cls(everything=True)
        if words == ["none"]:
            return cls()
        if "all" in words or "none" in words:
            raise InputProblem("--approve takes `all`, `none`, or step ids, not a mix")
        unknown = [word for word in words if word not in step_ids]
        if unknown:
            raise InputProblem(f"--approve: the workflow has no step {', '.join(map(repr, unknown))} "
                               f"(its steps: {', '.join(step_ids) or 'none'})")
        return cls(steps=set(words))

    def approves(self, step_id: str) -> bool:
        return self.everything or step_id in self.steps


@dataclass
class Plan:
    workflow: Any  # CompiledWorkflow
    source: str
    body: bytes
    event_file: Path
    kind: str | None
    github_event: str | None
    params: list[str]
    approvals: Approvals
    secrets: dict[str, str]
    mocks: list[Any]
    offline: bool
    timeout: float
    notes: list[str] = field(default_factory=list)


def pairs(values: list[str], option: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for value in values:
        key, equals, rest = value.partition("=")
        if not equals or not key.strip():
            raise InputProblem(f"{option} {value!r}: use NAME=VALUE")
        result[key.strip()] = rest
    return result


def find_workflow(reference: str, settings: Settings) -> Any:
    from bot.engine.loader import load_file, workflow_files

    path = Path(reference)
    if path.suffix in (".yml", ".yaml") or path.is_file():
        if not path.is_file():
            raise InputProblem(f"{path}: no such workflow file")
        return load_file(path)
    directory = settings.workflows_dir
    if not directory.is_dir():
        raise InputProblem(f"no workflow file {reference!r}, and no workflows directory at {directory}")
    for file in workflow_files([directory]):
        try:
            workflow = load_file(file)
        except WorkflowError as exc:
            if file.stem == reference:
                raise
            del exc  # another file's problems are `relaybot validate`'s business, not this run's
            continue
        if workflow.name == reference:
            return workflow
    raise InputProblem(f"no workflow named {reference!r} in {directory} (give a file path, or set "
                       "RELAYBOT_WORKFLOWS_DIR)")


TIMED_TRIGGERS = ("schedule", "poll")


def choose_source(workflow: Any, args: argparse.Namespace) -> str:
    """The trigger the event comes through: `--source`; else the one `--kind` names (`schedule`, `poll`,
    `command`); else, for any other kind (a tool's event), the first trigger that receives webhooks; else the
    first trigger."""
    triggers = list(workflow.triggers)
    if args.kind == "command" or args.source == "command":
        return "command"
    if args.source:
        if args.source not in triggers:
            raise InputProblem(f"--source {args.source}: the workflow's triggers are {', '.join(triggers)} "
                               "(and `command`)")
        return str(args.source)
    if not triggers:
        return "command"
    if args.kind in triggers:
        return str(args.kind)
    if args.kind:
        received = [trigger for trigger in triggers if trigger not in TIMED_TRIGGERS]
        if received:
            return str(received[0])
    return str(triggers[0])


def github_event_name(workflow: Any, kind: str | None, event_file: Path, notes: list[str]) -> str:
    if kind:
        return kind.split(".")[0]
    config = workflow.triggers.get("github")
    events = getattr(config, "events", None)
    if events:
        return str(events[0])
    guess = event_file.name.split(".")[0]
    notes.append(f"sent as X-GitHub-Event: {guess} (from the file name; --kind chooses another)")
    return guess


def make_plan(args: argparse.Namespace, settings: Settings) -> Plan:
    from bot.emulator.scripted_http import parse_mock
    from bot.slack.secrets import name_problem, value_problem

    workflow = find_workflow(args.workflow, settings)
    try:
        body = args.event.read_bytes()
    except OSError as exc:
        raise InputProblem(f"--event {args.event}: {exc.strerror or exc}") from None
    source = choose_source(workflow, args)
    notes: list[str] = []
    if source != "webhook":
        try:
            json.loads(body)
        except ValueError as exc:
            raise InputProblem(f"--event {args.event}: not valid JSON ({exc})") from None
    step_ids = [step.id for step in workflow.steps]
    waiting = [step.id for step in workflow.steps if step.needs_approval]
    approvals = Approvals.parse(args.approve, step_ids, waiting)
    for step_id in sorted(approvals.steps - set(waiting)):
        notes.append(f"--approve {step_id}: that step does not wait for approval; nothing to approve")
    try:
        mocks = [parse_mock(spec) for spec in args.mock]
    except ValueError as exc:
        raise InputProblem(str(exc)) from None
    secrets = pairs(args.secret, "--secret")
    for name, value in secrets.items():
        if problem := name_problem(name) or value_problem(value):
            raise InputProblem(f"--secret {name}: {problem}")
    params = [f"{key}={value}" for key, value in pairs(args.param, "--param").items()]
    github_event = github_event_name(workflow, args.kind, args.event, notes) if source == "github" else None
    return Plan(workflow=workflow, source=source, body=body, event_file=args.event, kind=args.kind,
                github_event=github_event, params=params, approvals=approvals, secrets=secrets, mocks=mocks,
                offline=args.offline, timeout=args.timeout, notes=notes)


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class Result:
    outcome: str | None  # the run's outcome; None when no run started or it did not finish
    problem: str | None = None
    run_id: str | None = None
    # The bot refused what it was given (the parameters, the event): the arguments are wrong, exit 2.
    refused_input: bool = False


def test_settings(settings: Settings, *, url: str, database: Path, signing_secret: str, bot_token: str) -> Settings:
    from bot.crypto import generate_master_key_text

    return settings.model_copy(update={
        "slack_signing_secret": signing_secret, "slack_bot_token": bot_token, "slack_api_url": f"{url}/api/",
        "slack_client_id": None, "slack_client_secret": None, "slack_app_token": None,
        "database_url": f"sqlite+aiosqlite:///{database}",
        "master_keys": [generate_master_key_text()], "master_key_file": None,
        "public_url": url, "admins": [TESTER], "slack_channel_rate": 0.0, "worker_poll_interval": 0.1,
    })


def build_emulator(plan: Plan, bot_token: str, signing_secret: str) -> Any:
    """A workspace with a tester (admin, starts things) and an approver allowed to decide every step."""
    from bot.emulator.webapi import SlackEmulator

    emulator = SlackEmulator(signing_secret=signing_secret)
    emulator.add_team(TEAM_ID, "relaybot-test", bot_token=bot_token)
    emulator.add_user(TEAM_ID, TESTER, "tester", is_admin=True)
    emulator.add_user(TEAM_ID, APPROVER, "approver")
    emulator.add_channel(TEAM_ID, CHANNEL_ID, "relaybot-test")
    groups: set[str] = set()
    for step in plan.workflow.steps:
        approvers = step.approvers
        if approvers is None:
            continue
        for user in approvers.users:
            if user not in emulator.teams[TEAM_ID].users:
                emulator.add_user(TEAM_ID, user, f"approver-{user.lower()}")
        groups.update(approvers.groups)
    for index, group in enumerate(sorted(groups)):
        is_id = group.startswith("S") and group[1:].isalnum() and group.upper() == group
        emulator.add_usergroup(TEAM_ID, group if is_id else f"S0GROUP{index:03d}",
                               group.lstrip("@").lower() if not is_id else group.lower(), [APPROVER])
    return emulator


def clicker_for(step: Any) -> str:
    approvers = step.approvers
    if approvers is not None and approvers.users and not approvers.groups:
        return str(approvers.users[0])
    return APPROVER


class DryRun:
    def __init__(self, plan: Plan, settings: Settings, database: Path, out: TextIO) -> None:
        import secrets

        from bot.emulator.sandbox import Sandbox
        from bot.emulator.scripted_http import ScriptedHttpClient
        from bot.engine.loader import Catalog

        self.plan = plan
        self.out = out
        signing_secret, bot_token = secrets.token_hex(16), f"xoxb-test-{secrets.token_hex(12)}"
        self.emulator = build_emulator(plan, bot_token, signing_secret)
        self.http = ScriptedHttpClient(answers=plan.mocks, offline=plan.offline, allow=settings.http_allow,
                                       timeout=settings.http_timeout, max_response=settings.http_max_response)
        # No poll or schedule of its own: the one event given is the only one this dry run sees.
        self.sandbox = Sandbox(emulator=self.emulator, catalog=Catalog([plan.workflow]), http=self.http,
                               triggers=False,
                               settings_for=lambda url: test_settings(settings, url=url, database=database,
                                                                      signing_secret=signing_secret,
                                                                      bot_token=bot_token))

    @property
    def services(self) -> Any:
        assert self.sandbox.services is not None
        return self.sandbox.services

    async def command(self, text: str, *, user: str = TESTER) -> str:
        """Type `/relay <text>` in the test channel; the ephemeral reply's text."""
        before = len(self.emulator.responses)
        command = self.services.settings.command
        status, _ = await self.emulator.slash_command(TEAM_ID, CHANNEL_ID, user, text, command=command)
        if status != 200:
            raise RuntimeError(f"{command} {text}: the bot answered HTTP {status}")
        await self.emulator.wait_for(lambda: len(self.emulator.responses) > before, timeout=15)
        return str(self.emulator.responses[before].get("text") or "")

    async def store_secrets(self) -> None:
        """Sealed into the `secrets` table by the same code as the `/relay secret set` form."""
        from bot.audit import Actor
        from bot.slack.secrets import store_secret

        self.services.log_masker.register(*self.plan.secrets.values())
        for name, value in self.plan.secrets.items():
            await store_secret(self.services.db, self.services.keyring, team_id=TEAM_ID, name=name, value=value,
                               actor=Actor(TESTER, "tester"))

    async def subscription_id(self) -> int | None:
        from sqlalchemy import select

        from bot.store.models import Subscription

        async with self.services.db.read() as session:
            return (await session.execute(select(Subscription.id).where(
                Subscription.team_id == TEAM_ID, Subscription.channel_id == CHANNEL_ID,
                Subscription.workflow == self.plan.workflow.name))).scalar_one_or_none()

    async def deliver(self) -> str | None:
        """Send the event through its door; a problem's text, or None."""
        from bot.store.inbox import NewEvent
        from integrations.registry import INTEGRATIONS

        plan = self.plan
        if plan.source == "command":
            data = json.loads(plan.body)
            if not isinstance(data, dict):
                return "--kind command: the event file must be a JSON object of key=value arguments"
            words = [shlex.quote(f"{key}={value if isinstance(value, str) else json.dumps(value)}")
                     for key, value in data.items()]
            reply = await self.command(" ".join(["run", shlex.quote(plan.workflow.name), *words]))
            return None if "Started run" in reply else f"/relay run was refused: {reply}"
        integration = INTEGRATIONS.get(plan.source)
        if integration is not None and integration.receives_webhooks:
            if integration.secret_generated_by_tool:
                await self.paste_tool_secret(plan.source)
            try:
                status, text, _ = await self.emulator.deliver_webhook(TEAM_ID, plan.source, plan.body,
                                                                      event=plan.github_event)
            except (LookupError, KeyError) as exc:
                return str(exc)
            return None if status in (200, 202) else f"the webhook door answered HTTP {status}: {text[:300]}"
        # Poll and schedule events are not sent by anyone: their trigger loops store them, and so does this.
        subscription = await self.subscription_id()
        data = json.loads(plan.body)
        await self.services.inbox.store(NewEvent(
            team_id=TEAM_ID, source=plan.source, delivery_id=f"test:{uuid.uuid4().hex}",
            kind=plan.kind or plan.source, payload=data, received_at=datetime.now(UTC),
            summary=f"{plan.source} event from {plan.event_file.name}", event_name=plan.kind or plan.source,
            subscription_id=subscription))
        self.services.wake()
        return None

    async def paste_tool_secret(self, integration: str) -> None:
        """A tool that makes its own signing secret (PagerDuty): paste it into relaybot's form, as an admin would."""
        book = self.emulator.connections
        own = book.tool_secret(TEAM_ID, integration)
        command = self.services.settings.command
        status, _ = await self.emulator.slash_command(TEAM_ID, CHANNEL_ID, TESTER, f"connect {integration} set-secret",
                                                      command=command)
        if status != 200:
            raise RuntimeError(f"{command} connect {integration} set-secret: the bot answered HTTP {status}")
        modal = await self.emulator.wait_for(lambda: self.emulator.open_modal(TEAM_ID, TESTER), timeout=15)
        values = {block["block_id"]: {block["element"]["action_id"]: own}
                  for block in modal["view"].get("blocks") or [] if block.get("type") == "input"}
        notes = self.emulator.teams[TEAM_ID].ephemeral
        before = len(notes)
        result = await self.emulator.submit_view(TEAM_ID, TESTER, modal["view"]["id"], values)
        if result["status"] != 200 or result["errors"]:
            raise RuntimeError(f"the {integration} signing-secret form was refused: {result['errors']}")
        # The form closes at once; the secret is stored after. Its confirmation says it is in place.
        await self.emulator.wait_for(lambda: len(notes) > before, timeout=15)
        known = book.get(TEAM_ID, integration)
        if known is None or not known.connection_id or known.secret != own:
            raise RuntimeError(f"relaybot did not confirm the {integration} connection: {notes[-1].get('text')}")

    async def latest_run(self) -> Any:
        from sqlalchemy import select

        from bot.store.models import Run, Step

        async with self.services.db.read() as session:
            run = (await session.execute(select(Run).where(Run.team_id == TEAM_ID)
                                         .order_by(Run.created_at.desc()).limit(1))).scalar_one_or_none()
            if run is None:
                return None, []
            steps = list((await session.execute(select(Step).where(Step.run_id == run.id)
                                                .order_by(Step.position))).scalars())
        return run, steps

    async def drive(self) -> Result:
        """Decide each waiting step by clicking its card's button; return when the run is over and shown."""
        from bot.engine import states

        deadline = time.monotonic() + self.plan.timeout
        clicked: dict[tuple[str, str], int] = {}
        while time.monotonic() < deadline:
            version = self.emulator.version
            # Idle first, runs second: the intake's batch that starts the run could commit between the two reads
            # the other way round, and a run that had started was then reported as none.
            idle = await self.services.engine.idle()
            run, steps = await self.latest_run()
            if run is None:
                if idle:
                    return Result(None, problem=self.no_run_reason())
            elif run.state in states.FINAL_RUN_STATES:
                if await self.sandbox.settled():
                    return Result(run.outcome or run.state, run_id=run.id)
            else:
                refusal = self.refusal_after(clicked)
                if refusal:
                    return Result(None, problem=f"the click was refused: {refusal}", run_id=run.id)
                waiting = next((step for step in steps if step.state == states.STEP_WAITING), None)
                key = (run.id, waiting.step_id) if waiting is not None else None
                if key is not None and key not in clicked and await self.click(run, key[1]):
                    clicked[key] = len(self.emulator.responses)
            await self.emulator.wait_version(version, timeout=0.1)
        run, _ = await self.latest_run()
        state = run.state if run is not None else "not started"
        return Result(None, problem=f"the run did not finish within {self.plan.timeout:g}s (it is {state})",
                      run_id=run.id if run is not None else None)

    def refusal_after(self, clicked: dict[tuple[str, str], int]) -> str | None:
        # A decision that wins is silent; a refused click gets an ephemeral explanation.
        for before in clicked.values():
            for response in self.emulator.responses[before:]:
                return str(response.get("text") or "refused")
        return None

    async def click(self, run: Any, step_id: str) -> bool:
        """Press Approve or Skip on the card, once the card showing this step's buttons has reached Slack."""
        if not run.card_ts:
            return False
        card = self.emulator.message(TEAM_ID, CHANNEL_ID, run.card_ts)
        block_id = f"run:{run.id}:{step_id}"
        if card is None or not any(block.get("block_id") == block_id for block in card.blocks or []):
            return False
        compiled = self.plan.workflow.step(step_id)
        action = "approve" if self.plan.approvals.approves(step_id) else "skip"
        status, _ = await self.emulator.click(TEAM_ID, CHANNEL_ID, clicker_for(compiled), run.card_ts, action)
        return status == 200

    def no_run_reason(self) -> str:
        trigger = self.plan.source
        return (f"the event started no run: the workflow's `on.{trigger}` filter or its `if:` did not match it"
                + (f" (`if: {self.plan.workflow.model.if_}`)" if self.plan.workflow.model.if_ else ""))

    # ------------------------------------------------------------------------------------------ output

    def name_of(self, user: str) -> str:
        person = self.emulator.teams[TEAM_ID].users.get(user)
        return person.name if person else user

    def channel_of(self, channel: str) -> str:
        return str(self.emulator.teams[TEAM_ID].channels.get(channel, {}).get("name", channel))

    def report(self, result: Result) -> None:
        from bot.emulator import plaintext
        from bot.masking import Masker

        masker = Masker(self.plan.secrets.values())
        plan, out = self.plan, self.out
        origin = {"command": "/relay run", "github": f"github `{plan.github_event}` webhook"}.get(
            plan.source, f"{plan.source} event")
        print(f"relaybot test: `{plan.workflow.name}` ← {origin} from {plan.event_file}", file=out)
        for note in plan.notes:
            print(f"  note: {note}", file=out)
        cards = self.emulator.channel_messages(TEAM_ID, CHANNEL_ID)
        card = next((message for message in cards if message.blocks), None)
        if card is not None:
            print("\nThread", file=out)
            for reply in self.emulator.thread(TEAM_ID, CHANNEL_ID, card.ts):
                for number, line in enumerate(plaintext.text(reply.text, name_of=self.name_of,
                                                                  channel_of=self.channel_of).splitlines()):
                    print(("  " if number == 0 else "    ") + line, file=out)
            print("\nCard", file=out)
            for line in plaintext.blocks(card.blocks, name_of=self.name_of, channel_of=self.channel_of):
                print(f"  {line}", file=out)
        if self.http.exchanges:
            print("\nOutbound HTTP", file=out)
            for exchange in self.http.exchanges:
                answer = (f"{exchange.status}" + (" (mocked)" if exchange.mocked else "")
                          if exchange.status is not None else f"failed: {exchange.error}")
                print(f"  {exchange.method} {masker.text(exchange.url)} → {masker.text(answer)}", file=out)
        if result.outcome is not None:
            print(f"\nResult: run {result.run_id} {result.outcome}", file=out)
        else:
            print(f"\nResult: {masker.text(result.problem or 'no result')}", file=out)

    async def execute(self) -> Result:
        await self.sandbox.start()
        try:
            await self.store_secrets()
            words = ["enable", shlex.quote(self.plan.workflow.name), *map(shlex.quote, self.plan.params)]
            reply = await self.command(" ".join(words))
            if await self.subscription_id() is None:
                return Result(None, problem=f"/relay enable was refused: {reply}", refused_input=True)
            problem = await self.deliver()
            if problem:
                return Result(None, problem=problem, refused_input=True)
            return await self.drive()
        finally:
            await self.sandbox.stop()


# ---------------------------------------------------------------------------------------------- the command


async def dry_run(plan: Plan, settings: Settings, database: Path, out: TextIO) -> int:
    run = DryRun(plan, settings, database, out)
    try:
        result = await run.execute()
    except (TimeoutError, RuntimeError) as exc:
        result = Result(None, problem=f"the bot did not answer as expected: {exc}")
    run.report(result)
    if result.refused_input:
        return EXIT_CONFIG
    return 0 if result.outcome == "succeeded" else EXIT_RUN_FAILED


def run(args: argparse.Namespace, settings: Settings) -> int:
    import logging

    root = logging.getLogger()
    level = root.level
    if not args.verbose:
        # The audit trail is the output; the bot's own log would bury it.
        root.setLevel(max(level, logging.WARNING))
    try:
        plan = make_plan(args, settings)
        with tempfile.TemporaryDirectory(prefix="relaybot-test-") as directory:
            return asyncio.run(dry_run(plan, settings, Path(directory) / "relaybot.db", sys.stdout))
    except InputProblem as exc:
        print(f"relaybot test: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        root.setLevel(level)
