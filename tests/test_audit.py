"""The audit log: one hash chain per workspace, `relaybot audit verify` finds tampering, `export` streams it."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from bot import audit
from bot.housekeeping import RETENTION_EVERY, Housekeeping, claim, forget_delivered, prune
from bot.store.db import Database
from bot.store.models import AuditRecord, Event, OutboxMessage, PeriodicJob, Run, Step
from tests.conftest import ALICE, BOB, BOTH_DATABASES, TEAM, buttons, connection_from, write_workflow

GATE = """
name: gate
on: webhook
steps:
  - id: check
    uses: http.request
    with: {url: "TARGET/check"}
  - id: deploy
    approval: required
    uses: http.request
    with: {url: "TARGET/deploy", method: PUT}
"""


def relaybot(*args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLACK_", "RELAYBOT_"))}
    env["RELAYBOT_DATABASE_URL"] = database_url
    return subprocess.run([sys.executable, "-m", "bot", *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


async def workload(make_bot, workflows, target, runs: int = 3):
    write_workflow(workflows, "gate", GATE.replace("TARGET", target.url))
    bot = await make_bot()
    url, secret = connection_from(await bot.command("enable gate"), "webhook")
    for index in range(runs):
        await bot.post(url, json.dumps({"summary": f"run {index}"}).encode(),
                       {"Authorization": f"Bearer {secret}", "X-Request-Id": f"d{index}"})
    await bot.slack.wait_for(lambda: len([m for m in bot.cards() if "approve" in buttons(m)]) == runs)
    for index, card in enumerate(bot.cards()):
        await bot.click(card, "approve" if index % 2 == 0 else "skip", user=ALICE if index % 2 == 0 else BOB)
    for card in bot.cards():
        await bot.wait_thread(card, "Run succeeded")
    await bot.settle()
    return bot


async def test_verify_passes_then_finds_every_kind_of_tampering(make_bot, workflows, target, tmp_path):
    bot = await workload(make_bot, workflows, target)
    await bot.stop()
    original = tmp_path / "relaybot.db"
    result = relaybot("audit", "verify", database_url=f"sqlite+aiosqlite:///{original}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{TEAM}: " in result.stdout and "chain intact" in result.stdout
    total = sqlite3.connect(original).execute("SELECT count(*) FROM audit_records").fetchone()[0]
    assert total > 20

    def tampered(name: str, *statements: str) -> subprocess.CompletedProcess[str]:
        copy = tmp_path / f"{name}.db"
        shutil.copy(original, copy)
        with sqlite3.connect(copy) as connection:
            for statement in statements:
                connection.execute(statement)
        return relaybot("audit", "verify", database_url=f"sqlite+aiosqlite:///{copy}")

    edited = tampered("edited", "UPDATE audit_records SET actor_name = 'mallory' WHERE seq = 7")
    assert edited.returncode == 1 and "record 7: its content does not match its hash (edited)" in edited.stdout
    deleted = tampered("deleted", "DELETE FROM audit_records WHERE seq = 5")
    assert deleted.returncode == 1 and "record 5: missing" in deleted.stdout
    swapped = tampered("swapped", "UPDATE audit_records SET seq = -1 WHERE seq = 4",
                       "UPDATE audit_records SET seq = 4 WHERE seq = 9",
                       "UPDATE audit_records SET seq = 9 WHERE seq = -1")
    assert swapped.returncode == 1 and "record 4:" in swapped.stdout
    inserted = tampered("inserted", "UPDATE audit_records SET seq = seq + 1000 WHERE seq >= 6",
                        "UPDATE audit_records SET seq = seq - 999 WHERE seq >= 1006",
                        "INSERT INTO audit_records (team_id, seq, at, actor, actor_name, action, run_id, workflow, "
                        "workflow_hash, step, outcome, reason, details, prev_hash, hash) SELECT team_id, 6, at, "
                        "'U0MALLORY', 'mallory', 'step.approved', run_id, workflow, workflow_hash, step, outcome, "
                        "reason, details, prev_hash, hash FROM audit_records WHERE seq = 5")
    assert inserted.returncode == 1 and "record 6:" in inserted.stdout
    truncated = tampered("truncated", f"DELETE FROM audit_records WHERE seq = {total}")
    assert truncated.returncode == 1 and "records were removed from the end" in truncated.stdout
    beheaded = tampered("beheaded", f"DELETE FROM audit_records WHERE seq = {total}", "DELETE FROM audit_heads")
    assert beheaded.returncode == 1 and "the chain's head is missing" in beheaded.stdout
    # The bot appending while verify reads: the head it read first is two records behind the records it reads
    # after. Verify once called that "records were removed from the end".
    behind = "UPDATE audit_heads SET seq = seq - 2, hash = (SELECT hash FROM audit_records r " \
             "WHERE r.team_id = audit_heads.team_id AND r.seq = audit_heads.seq - 2)"
    live = tampered("live", behind)
    assert live.returncode == 0 and f"{TEAM}: {total} records, chain intact, head #{total}" in live.stdout, live.stdout
    rewritten = tampered("rewritten", behind, "UPDATE audit_heads SET hash = '" + "0" * 64 + "'")
    assert rewritten.returncode == 1 and "does not match the chain's head" in rewritten.stdout


async def test_export_lists_who_approved_what_and_when_and_matches_the_thread(make_bot, workflows, target,
                                                                               tmp_path):
    bot = await workload(make_bot, workflows, target, runs=1)
    card = bot.cards()[0]
    thread = bot.thread_texts(card)
    async with bot.services.db.read() as session:
        run = (await session.execute(select(Run))).scalar_one()
    await bot.stop()
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'relaybot.db'}"
    result = relaybot("audit", "export", "--run", run.id, database_url=database_url)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["action"] for r in records] == ["run.started", "step.started", "step.finished", "step.waiting",
                                               "step.approved", "step.started", "step.finished", "run.finished"]
    approval = records[4]
    assert approval["actor"] == ALICE and approval["actor_name"] == "alice" and approval["step"] == "deploy"
    assert datetime.fromisoformat(approval["at"].replace("Z", "+00:00")) <= datetime.now(UTC)
    assert all(len(r["hash"]) == 64 and len(r["prev_hash"]) == 64 for r in records)
    thread_steps = [line for line in thread if "approved by <@U0ALICE01>" in line]
    assert len(thread_steps) == 1 and len(thread) == len(records)
    as_csv = relaybot("audit", "export", "--team", TEAM, "--format", "csv", database_url=database_url)
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert rows[0]["seq"] == "1" and {"hash", "prev_hash", "actor"} <= set(rows[0])
    later = relaybot("audit", "export", "--since", "2999-01-01", database_url=database_url)
    assert later.returncode == 0 and later.stdout == ""
    mistyped = relaybot("audit", "export", "--run", "RNOSUCHRUN", database_url=database_url)
    assert mistyped.returncode == 1 and "no records of run RNOSUCHRUN" in mistyped.stderr


async def test_checkpoints_post_the_head_hash_and_run_once_across_processes(make_bot, workflows, target, slack):
    slack.add_channel(TEAM, "C0AUDIT01", "audit")
    bot = await make_bot(audit_channel="C0AUDIT01")
    await bot.command("list")
    await bot.command("connect webhook")
    housekeeping = bot.services.housekeeping
    # The round at start-up found no records to checkpoint; make the job due again, as an hour later.
    async with bot.services.db.write() as session:
        await session.execute(update(PeriodicJob).values(last_run_at=None))
    await housekeeping.run_due()
    posted = await slack.wait_for(lambda: slack.channel_messages(TEAM, "C0AUDIT01"))
    async with bot.services.db.read() as session:
        checkpoint = (await session.execute(select(AuditRecord).where(AuditRecord.action == "audit.checkpoint"))
                      ).scalar_one()
    assert f"record #{checkpoint.details['seq']}, hash `{checkpoint.details['hash']}`" in posted[0].text
    # Due again only after an hour: a second round (or another process) posts nothing new.
    assert not await claim(bot.services.db, name="audit-checkpoint", every=timedelta(hours=1), owner="other")
    await housekeeping.run_due()
    await bot.settle()
    assert len(slack.channel_messages(TEAM, "C0AUDIT01")) == 1
    await bot.stop()  # on shutdown, the head as it is left
    assert len(slack.channel_messages(TEAM, "C0AUDIT01")) == 2


async def test_retention_prunes_run_data_keeps_the_audit_log_and_records_itself(make_bot, workflows, target,
                                                                              tmp_path):
    bot = await workload(make_bot, workflows, target, runs=2)
    db = bot.services.db
    async with db.write() as session:
        await session.execute(update(Run).values(finished_at=datetime.now(UTC) - timedelta(days=100)))
    pruned = await prune(db, older_than=timedelta(days=90))
    assert pruned == {TEAM: 2}
    async with db.read() as session:
        events = list((await session.execute(select(Event))).scalars())
        outputs = list((await session.execute(select(Step.outputs))).scalars())
        record = (await session.execute(select(AuditRecord).where(AuditRecord.action == "retention.pruned"))
                  ).scalar_one()
    assert all(event.payload == {} and event.pruned_at for event in events)
    assert outputs == [None] * len(outputs)
    assert record.details["runs"] == 2
    assert await prune(db, older_than=timedelta(days=90)) == {}
    await bot.stop()
    result = relaybot("audit", "verify", database_url=f"sqlite+aiosqlite:///{tmp_path / 'relaybot.db'}")
    assert result.returncode == 0, result.stdout


@BOTH_DATABASES
async def test_retention_gets_through_more_old_runs_than_a_batch_and_goes_on_at_once_when_out_of_time(
        make_bot, workflows, target):
    """Pruning took at most 5,000 runs every six hours: a workspace with more runs than that never caught up.
    Now every batch is its own transaction and a pass goes on until none is left; a pass that runs out of time
    leaves its job due again at once."""
    bot = await workload(make_bot, workflows, target, runs=5)
    db = bot.services.db
    async with db.write() as session:
        await session.execute(update(Run).values(finished_at=datetime.now(UTC) - timedelta(days=100)))
        await session.execute(update(PeriodicJob).values(last_run_at=None))  # the bot's own pass ran at its start
    keeping = Housekeeping(db=db, owner="test", audit_channel=None, retention=timedelta(days=90),
                           on_posted=lambda: None, prune_batch=2, prune_for=0.0)  # out of time after a batch

    async def events_pruned() -> int:
        async with db.read() as session:
            return int(await session.scalar(select(func.count()).select_from(Event)
                                             .where(Event.pruned_at.is_not(None))) or 0)

    progress = []
    for _ in range(4):
        await keeping.run_due()
        progress.append(await events_pruned())
    assert progress == [2, 4, 5, 5], "two runs a pass, each pass due at once until none was left"
    assert not await claim(db, name="retention", every=RETENTION_EVERY, owner="other"), "then due in six hours"
    async with db.read() as session:
        records = list((await session.execute(select(AuditRecord.details).where(
            AuditRecord.action == "retention.pruned").order_by(AuditRecord.seq))).scalars())
        outputs = list((await session.execute(select(Step.outputs))).scalars())
    assert [details["runs"] for details in records] == [2, 2, 1]
    assert outputs == [None] * len(outputs)

    async with db.write() as session:  # the same backlog, pruned without a time limit: one call does it all
        await session.execute(update(Event).values(pruned_at=None))
    assert await prune(db, older_than=timedelta(days=90), batch_size=2) == {TEAM: 5}


@BOTH_DATABASES
async def test_retention_deletes_the_slack_messages_the_outbox_is_done_with(make_bot, workflows, target):
    """The outbox kept every message it ever sent, with its text (a thread reply is run data too), for ever."""
    bot = await workload(make_bot, workflows, target, runs=3)
    db = bot.services.db
    await bot.settle()
    now = datetime.now(UTC)
    async with db.write() as session:
        done = int(await session.scalar(select(func.count()).select_from(OutboxMessage)) or 0)
        await session.execute(update(OutboxMessage).values(created_at=now - timedelta(days=100)))
        await session.execute(update(OutboxMessage).where(OutboxMessage.id == select(func.min(OutboxMessage.id))
                                                          .scalar_subquery()).values(state="failed"))
        waiting = OutboxMessage(team_id=TEAM, channel_id="C0DEPLOYS", run_id=None, lane="C0DEPLOYS", kind="post",
                                payload={"text": "still to go"}, state="pending", attempts=3,
                                not_before=now + timedelta(days=1), created_at=now - timedelta(days=100))
        recent = OutboxMessage(team_id=TEAM, channel_id="C0DEPLOYS", run_id=None, lane="C0DEPLOYS", kind="post",
                               payload={"text": "sent yesterday"}, state="sent", attempts=0,
                               not_before=now - timedelta(days=1), created_at=now - timedelta(days=1))
        session.add_all([waiting, recent])
    assert done >= 6
    assert await forget_delivered(db, older_than=timedelta(days=90), batch_size=2, until=0.0) == (2, False)
    assert await forget_delivered(db, older_than=timedelta(days=90), batch_size=2) == (done - 2, True)
    async with db.read() as session:
        left = list((await session.execute(select(OutboxMessage.payload).order_by(OutboxMessage.id))).scalars())
    assert left == [{"text": "still to go"}, {"text": "sent yesterday"}]
    assert await forget_delivered(db, older_than=timedelta(days=90)) == (0, True)


async def test_retention_clears_the_payloads_of_old_events_that_started_no_run(make_bot, workflows, target):
    """Pruning found events through their runs only: an event no workflow wanted (an `if:` said no, a
    connection test) kept its payload and headers for good, most of the table on a busy organisation hook."""
    from bot.housekeeping import forget_runless_events

    bot = await workload(make_bot, workflows, target, runs=1)
    db = bot.services.db
    now = datetime.now(UTC)
    old = now - timedelta(days=100)

    def event(delivery: str, received_at: datetime, **extra) -> Event:
        return Event(team_id=TEAM, source="webhook", delivery_id=delivery, kind="webhook", payload={"secret": 1},
                     headers={"User-Agent": "x"}, received_at=received_at, processed_at=received_at,
                     actionable=True, **extra)

    async with db.write() as session:
        await session.execute(update(Event).values(received_at=old))  # the workload's event, which has a run
        session.add_all([event(f"old-{index}", old) for index in range(3)] +
                        [event("recent", now), event("set-aside", old, intake_error="boom")])
    assert await forget_runless_events(db, older_than=timedelta(days=90), batch_size=2, until=0.0) == (2, False)
    assert await forget_runless_events(db, older_than=timedelta(days=90), batch_size=2) == (1, True)
    async with db.read() as session:
        kept = {row.delivery_id: (row.payload, row.headers, row.pruned_at is not None) for row in
                (await session.execute(select(Event))).scalars()}
    assert [kept[f"old-{index}"] for index in range(3)] == [({}, {}, True)] * 3
    assert kept["recent"] == ({"secret": 1}, {"User-Agent": "x"}, False)
    assert kept["set-aside"] == ({"secret": 1}, {"User-Agent": "x"}, False)  # `events retry` needs it
    ran = [value for key, value in kept.items() if key.startswith("d")]
    assert ran and all(payload for payload, _, pruned in ran)  # left to the pruning of runs


APPENDER = textwrap.dedent("""
    import asyncio, sys
    from bot import audit
    from bot.audit import Actor
    from bot.store.db import Database

    async def main(url, who, count):
        db = Database(url)
        for index in range(count):
            async with db.write() as session:
                await audit.append(session, team_id="T0SHARED01", actor=Actor(who), action="test.append",
                                   details={"index": index})
        await db.dispose()

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
""")


async def test_two_processes_appending_to_one_workspace_on_postgresql_keep_one_chain(postgres_database):
    from bot.store import migrate

    db = Database(postgres_database)
    await migrate.upgrade(db)
    await db.dispose()
    processes = [subprocess.Popen([sys.executable, "-c", APPENDER, postgres_database, who, "60"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for who in ("A", "B")]
    for process in processes:
        _, errors = process.communicate(timeout=120)
        assert process.returncode == 0, errors.decode()
    result = relaybot("audit", "verify", "--team", "T0SHARED01", database_url=postgres_database)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "120 records, chain intact" in result.stdout
    db = Database(postgres_database)
    try:
        async with db.read() as session:
            actors = [r.actor async for r in audit.iter_records(session, team_id="T0SHARED01")]
    finally:
        await db.dispose()
    assert sorted(set(actors)) == ["A", "B"]


@pytest.mark.parametrize("name", ["canonical"])
def test_canonical_encoding_is_stable(name):
    fields = {"team_id": "T", "seq": 1, "at": "2026-01-01T00:00:00.000000Z", "actor": "U1", "actor_name": "ü",
              "action": "a", "run_id": None, "workflow": None, "workflow_hash": None, "step": None, "outcome": None,
              "reason": None, "details": {"b": 1, "a": [1, 2]}, "prev_hash": audit.GENESIS}
    assert audit.canonical(fields) == audit.canonical(dict(reversed(list(fields.items()))))
    assert audit.record_hash(fields) == audit.record_hash(json.loads(json.dumps(fields)))
    assert Path  # the module's imports are all used


async def test_housekeeping_goes_on_after_the_database_failed_it_once(make_bot, monkeypatch):
    """One error claiming a job (a database restart, a lock) ended the housekeeping task: retention and the
    audit checkpoints stopped, silently, until the process restarted."""
    import asyncio

    import bot.housekeeping as housekeeping

    bot = await make_bot()
    keeping = Housekeeping(db=bot.services.db, owner="test", audit_channel=None, retention=timedelta(days=90),
                           on_posted=lambda: None, interval=0.05)
    ran: list[bool] = []

    async def work() -> bool:
        ran.append(True)
        return True

    keeping.jobs = [housekeeping.Job("probe", timedelta(0), work)]
    real_claim, calls = housekeeping.claim, []

    async def claim_failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("the database went away for a moment")
        return await real_claim(*args, **kwargs)

    monkeypatch.setattr(housekeeping, "claim", claim_failing_once)
    await keeping.start()
    try:
        for _ in range(100):
            if ran:
                break
            await asyncio.sleep(0.05)
    finally:
        await keeping.stop()
    assert ran and len(calls) >= 2
