"""The store: migrations match the models, on SQLite and PostgreSQL; SQLite writers never see "locked"."""

from __future__ import annotations

import asyncio
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, insert, select, text, update

from bot.engine.intake import pending_events
from bot.hooks import recent_duplicate
from bot.store import migrate
from bot.store.db import Database
from bot.store.inbox import Inbox, NewEvent
from bot.store.models import Base, Event, OutboxMessage
from bot.store.plans import in_index_order
from tests.conftest import BOTH_DATABASES

pytestmark = BOTH_DATABASES


def _differences(connection: Any) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    ignored_types = ("modify_type", "modify_nullable")
    changes = []
    for change in compare_metadata(context, Base.metadata):
        kind = change[0][0] if isinstance(change, list) else change[0]
        if kind in ignored_types:
            continue  # DateTime(timezone) and JSON spellings differ by dialect without meaning anything
        changes.append(change)
    return changes


async def test_migrations_create_exactly_the_models(database_url):
    db = Database(database_url)
    try:
        await migrate.upgrade(db)
        assert await migrate.current_revision(db) == migrate.head_revision()
        async with db.engine.connect() as connection:
            assert await connection.run_sync(_differences) == []
        await migrate.upgrade(db)  # a second upgrade is a no-op
        if not db.is_sqlite:  # webhook payloads: lz4, not pglz, where the server has it (this one does)
            async with db.engine.connect() as connection:
                method = await connection.scalar(text(
                    "SELECT attcompression FROM pg_attribute WHERE attrelid = 'events'::regclass "
                    "AND attname = 'payload'"))
            assert method in ("l", b"l")  # a "char" column: asyncpg gives bytes
            async with db.engine.connect() as connection:  # room on each page for a run's updates
                options = await connection.scalar(text("SELECT reloptions FROM pg_class WHERE relname = 'runs'"))
            assert "fillfactor=50" in options
    finally:
        await db.dispose()


async def test_concurrent_writers_never_fail(database_url):
    db = Database(database_url)
    await migrate.upgrade(db)
    inbox = Inbox(db)
    other = Database(database_url)  # a second pool, as a second process would have

    async def store(index: int) -> Any:
        from datetime import UTC, datetime

        return index % 150, await inbox.store(NewEvent(
            team_id="T1", source="webhook", delivery_id=f"d{index % 150}", kind="webhook", payload={"i": index},
            received_at=datetime.now(UTC)))

    async def write_directly(index: int) -> None:
        from datetime import UTC, datetime

        async with other.write() as session:
            session.add(Event(team_id="T2", source="webhook", delivery_id=f"x{index}", kind="webhook", payload={},
                              headers={}, received_at=datetime.now(UTC), actionable=True))

    try:
        results = await asyncio.gather(*[store(i) for i in range(300)], *[write_directly(i) for i in range(100)])
        stored = [result for result in results if result is not None]
        firsts = {key: outcome.event_id for key, outcome in stored if not outcome.duplicate}
        assert len(firsts) == 150, "each delivery is stored once, and its first caller is told so"
        assert all(outcome.event_id == firsts[key] for key, outcome in stored if outcome.duplicate)
        async with db.read() as session:
            assert await session.scalar(select(func.count()).select_from(Event).where(Event.team_id == "T1")) == 150
            assert await session.scalar(select(func.count()).select_from(Event).where(Event.team_id == "T2")) == 100
    finally:
        await inbox.close()
        await db.dispose()
        await other.dispose()


async def test_a_transaction_body_may_only_wait_for_the_database(database_url):
    """On SQLite `transaction()` runs its body whole on the writer thread: a body that awaits anything else is
    refused and rolled back (on PostgreSQL it is an ordinary transaction)."""
    from datetime import UTC, datetime

    from bot.store.db import SuspendedTransaction

    db = Database(database_url)
    await migrate.upgrade(db)

    async def naps_inside(session: Any) -> None:
        session.add(Event(team_id="T3", source="webhook", delivery_id="nap", kind="webhook", payload={},
                          headers={}, received_at=datetime.now(UTC), actionable=True))
        await session.flush()
        await asyncio.sleep(0.01)

    try:
        if db.is_sqlite:
            try:
                await db.transaction(naps_inside)
                raise AssertionError("a body that sleeps was run on the writer thread")
            except SuspendedTransaction:
                pass
            async with db.read() as session:
                assert await session.scalar(select(func.count()).select_from(Event)
                                            .where(Event.team_id == "T3")) == 0
        else:
            await db.transaction(naps_inside)

        async def count(session: Any) -> int:
            return int(await session.scalar(select(func.count()).select_from(Event)))

        # Writers of both kinds, urgent or not, and one cancelled while it waits: every one that ran committed.
        async def direct(index: int) -> None:
            async with db.write() as session:
                session.add(Event(team_id="T4", source="webhook", delivery_id=f"w{index}", kind="webhook",
                                  payload={}, headers={}, received_at=datetime.now(UTC), actionable=True))

        async def through_body(index: int) -> None:
            async def body(session: Any) -> None:
                session.add(Event(team_id="T4", source="webhook", delivery_id=f"b{index}", kind="webhook",
                                  payload={}, headers={}, received_at=datetime.now(UTC), actionable=True))
            await db.transaction(body, urgent=index % 2 == 0)

        doomed = asyncio.ensure_future(through_body(999))
        doomed.cancel()
        await asyncio.gather(*[direct(i) for i in range(30)], *[through_body(i) for i in range(30)])
        assert await db.transaction(count) >= 60
        async with db.read() as session:
            written = await session.scalar(select(func.count()).select_from(Event).where(Event.team_id == "T4"))
        assert written in (60, 61)  # the cancelled one may have got through before it was cancelled
    finally:
        await db.dispose()


async def _processed_events_of_one_workflow(session: Any, *, count: int, now: Any) -> list[int]:
    """A workflow version (hash "h" * 64) and `count` webhook events of workspace T1 already turned into runs, for
    tests that store runs; returns the events' ids in order."""
    from bot.store.models import WorkflowVersion

    session.add(WorkflowVersion(hash="h" * 64, name="wf", path="wf.yml", source="", created_at=now))
    await session.flush()
    await session.execute(insert(Event), [
        {"team_id": "T1", "source": "webhook", "delivery_id": f"d{index}", "kind": "webhook", "payload": {},
         "headers": {}, "received_at": now, "actionable": True, "processed_at": now} for index in range(count)])
    return list((await session.execute(select(Event.id).order_by(Event.id))).scalars().all())


async def _plan_of(session: Any, statement: Any, *, sqlite: bool) -> str:
    compiled = statement.compile(dialect=session.bind.dialect, compile_kwargs={"literal_binds": True})
    explain = "EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN "
    rows = (await session.execute(text(explain + str(compiled)))).all()
    return "\n".join(str(row[-1]) for row in rows)


async def test_the_intake_reads_one_batch_of_pending_events_however_many_wait(database_url):
    """During a burst the database's statistics still say few events are pending; the intake's query must walk
    the pending events in id order and stop after one batch, not read and sort all of them (it once took
    30-40 ms per batch on PostgreSQL with 10,000 events waiting)."""
    from datetime import UTC, datetime

    db = Database(database_url)
    await migrate.upgrade(db)
    now = datetime.now(UTC)

    def events(start: int, count: int, processed_at: datetime | None) -> list[dict[str, Any]]:
        return [{"team_id": "T1", "source": "webhook", "delivery_id": f"d{index}", "kind": "webhook",
                 "payload": {"i": index}, "headers": {}, "received_at": now, "actionable": True,
                 "processed_at": processed_at} for index in range(start, start + count)]

    try:
        # The statistics: none yet (a new database: PostgreSQL guesses that 0.5 % are pending), or taken when few
        # or no events were pending.
        for pending_at_analyze in (None, 0, 20):
            async with db.write() as session:
                await session.execute(text("DELETE FROM events"))
                await session.execute(insert(Event), events(0, 3000, now))
                if pending_at_analyze:
                    await session.execute(insert(Event), events(3000, pending_at_analyze, None))
            if pending_at_analyze is not None:
                async with db.engine.connect() as connection:
                    await connection.execute(text("ANALYZE"))
                    await connection.commit()
            statistics = "none" if pending_at_analyze is None else f"{pending_at_analyze} pending"
            pending_at_analyze = pending_at_analyze or 0
            async with db.write() as session:
                await session.execute(insert(Event), events(3000 + pending_at_analyze, 6000, None))
            async with db.write() as session:
                for skip_locked in ((False,) if db.is_sqlite else (False, True)):
                    async with in_index_order(session, postgres=not db.is_sqlite):
                        plan = await _plan_of(session, pending_events(100, skip_locked=skip_locked),
                                              sqlite=db.is_sqlite)
                    assert "ix_events_pending" in plan, (statistics, plan)
                    assert "Sort" not in plan and "TEMP B-TREE" not in plan, (statistics, plan)
                taken = (await session.execute(pending_events(100, skip_locked=False))).scalars().all()
                assert [event.delivery_id for event in taken] == [f"d{index}" for index in range(3000, 3100)]
                if not db.is_sqlite:  # and only for that statement
                    assert (await session.execute(text("SHOW enable_sort"))).scalar() == "on"
    finally:
        await db.dispose()


async def test_the_outbox_reads_a_page_of_pending_messages_however_many_wait(database_url):
    """While Slack rate-limits, thousands of messages wait. On a database without statistics PostgreSQL read and
    sorted all of them for each page of the lane scan (3 ms per page at 10,000, under the claim lock)."""
    from datetime import UTC, datetime

    from bot.engine.posting import newest_pending
    from bot.slack.outbox import pending_page

    db = Database(database_url)
    await migrate.upgrade(db)
    now = datetime.now(UTC)

    def messages(count: int, state: str) -> list[dict[str, Any]]:
        return [{"team_id": "T1", "channel_id": "C1", "run_id": None, "lane": f"C{index % 50}", "kind": "post",
                 "payload": {"text": "x" * 200}, "state": state, "attempts": 0, "not_before": now, "created_at": now}
                for index in range(count)]

    try:
        async with db.write() as session:
            await session.execute(insert(OutboxMessage), messages(3000, "sent"))
            await session.execute(insert(OutboxMessage), messages(6000, "pending"))
        async with db.write() as session:
            async with in_index_order(session, postgres=not db.is_sqlite):
                plan = await _plan_of(session, pending_page(after=0, now=now), sqlite=db.is_sqlite)
            assert "ix_outbox_pending" in plan, plan
            assert "Sort" not in plan and "TEMP B-TREE" not in plan, plan
            assert len((await session.execute(pending_page(after=0, now=now))).all()) == 256
        async with db.engine.connect() as connection:
            await connection.execute(text("ANALYZE"))
            await connection.commit()
        # A lane's pending messages (claims, lease renewals, a step's thread reply): from that lane's entries.
        lanes = (select(OutboxMessage.id).where(OutboxMessage.lane.in_(["C7", "C8"]), OutboxMessage.state == "pending")
                 .order_by(OutboxMessage.lane, OutboxMessage.id))
        async with db.read() as session:
            for name, query in {"lanes": lanes, "newest": newest_pending("C7")}.items():
                plan = await _plan_of(session, query, sqlite=db.is_sqlite)
                assert "ix_outbox_pending_lanes" in plan, (name, plan)
            assert len((await session.execute(lanes)).all()) == 240
            assert await session.scalar(newest_pending("C7")) is not None
    finally:
        await db.dispose()


async def test_the_duplicate_check_of_a_content_hash_looks_up_exact_ids_however_many_events_are_stored(
        database_url):
    """Alertmanager sends no delivery id: a notification is a duplicate of an identical one (same content hash)
    within five minutes. The check once matched `LIKE '<hash>@%'`, which neither database can answer from the
    unique index: it read every Alertmanager event the workspace ever stored (25 ms at 200,000 on SQLite)."""
    from datetime import UTC, datetime, timedelta

    db = Database(database_url)
    await migrate.upgrade(db)
    now = datetime.now(UTC)
    try:
        async with db.write() as session:
            await session.execute(insert(Event), [
                {"team_id": "T1", "source": "alertmanager", "delivery_id": f"am-{index:040x}@{index}",
                 "kind": "alert.firing", "payload": {}, "headers": {}, "received_at": now, "actionable": True,
                 "processed_at": now} for index in range(3000)])
        async with db.engine.connect() as connection:
            await connection.execute(text("ANALYZE"))
            await connection.commit()
        query = recent_duplicate(team_id="T1", source="alertmanager", delivery_ids=["am-x@1", "am-x@0"],
                                 since=now - timedelta(minutes=5))
        async with db.read() as session:
            plan = await _plan_of(session, query, sqlite=db.is_sqlite)
            assert await session.scalar(query) is None
            found = recent_duplicate(team_id="T1", source="alertmanager", delivery_ids=[f"am-{7:040x}@7", "no"],
                                     since=now - timedelta(minutes=5))
            assert await session.scalar(found) is not None
        if db.is_sqlite:
            assert "delivery_id=?" in plan, plan
        else:
            conditions = [line for line in plan.splitlines() if "Index Cond" in line]
            assert conditions and all("delivery_id" in line for line in conditions), plan
    finally:
        await db.dispose()


async def test_the_home_tab_and_the_active_runs_gauge_read_an_index_range_however_many_runs_are_stored(
        database_url):
    """The App Home tab is built each time a user opens it, and the runs-active gauge on every scrape. They once
    grouped or sorted every run the workspace ever had (157 + 71 + 24 ms per opening and 16 ms per scrape at
    200,000 runs on SQLite); run rows are kept after retention, so that only grew."""
    from datetime import UTC, datetime, timedelta

    from bot.engine.worker import active_runs_by_state
    from bot.slack.home import last_runs_query, latest_query, waiting_query
    from bot.store.models import Run, Step, Subscription

    db = Database(database_url)
    await migrate.upgrade(db)
    now = datetime.now(UTC)
    workflows = [f"wf{index}" for index in range(5)]
    try:
        async with db.write() as session:
            event_ids = await _processed_events_of_one_workflow(session, count=3000, now=now)
            await session.execute(insert(Run), [
                {"id": f"r{index:05d}", "team_id": "T1", "event_id": event_id, "workflow": workflows[index % 5],
                 "workflow_hash": "h" * 64, "channel_id": f"C{index % 3}",
                 "state": "waiting" if index % 500 == 0 else "succeeded", "title": "", "context": {}, "card": {},
                 "created_at": now - timedelta(seconds=3000 - index),
                 "finished_at": None if index % 500 == 0 else now} for index, event_id in enumerate(event_ids)])
            await session.execute(insert(Subscription), [
                {"team_id": "T1", "channel_id": f"C{channel}", "workflow": workflow, "params": {}, "created_by": "U1",
                 "created_at": now} for workflow in workflows for channel in range(3)])
            subscription_ids = (await session.execute(select(Subscription.id))).scalars().all()
            await session.execute(insert(Step), [
                {"run_id": f"r{index:05d}", "team_id": "T1", "position": 0, "step_id": "s", "title": "s",
                 "state": "waiting" if index % 500 == 0 else "succeeded"} for index in range(3000)])
        async with db.engine.connect() as connection:
            await connection.execute(text("ANALYZE"))
            await connection.commit()
        async with db.read() as session:
            if not db.is_sqlite:  # a table this small is cheaper to scan; the plan at scale is what is checked
                await session.execute(text("SET LOCAL enable_seqscan = off"))
            queries = {"last runs": last_runs_query("T1", list(subscription_ids)), "waiting": waiting_query("T1"),
                       "latest": latest_query("T1", {"C0", "C2"}), "active gauge": active_runs_by_state()}
            indexes = {"last runs": "ix_runs_team_workflow", "waiting": "ix_runs_state",
                       "latest": "ix_runs_team_created", "active gauge": "ix_runs_state"}
            for name, query in queries.items():
                plan = await _plan_of(session, query, sqlite=db.is_sqlite)
                assert indexes[name] in plan and "SCAN runs\n" not in plan + "\n", (name, plan)
                assert "Seq Scan on runs" not in plan, (name, plan)
                if name != "waiting":  # that one may sort the workspace's waiting runs it found, nothing more
                    assert "TEMP B-TREE FOR ORDER BY" not in plan and "Sort Key: runs" not in plan, (name, plan)
            last = {(run.workflow, run.channel_id): run.id
                    for run in (await session.execute(queries["last runs"])).scalars()}
            # Run r02999 is wf4 in C0 (2999 % 5, 2999 % 3); the last of each pair is among the last 15 runs.
            assert len(last) == 15 and last[("wf4", "C2")] == "r02999" and last[("wf0", "C0")] == "r02985"
            assert [run.id for run, _ in (await session.execute(queries["waiting"])).all()] == [
                "r02500", "r02000", "r01500", "r01000", "r00500", "r00000"]
            # Only the channels asked for: r02998 is in C1.
            assert [run.id for run in (await session.execute(queries["latest"])).scalars()][:2] == ["r02999",
                                                                                                 "r02997"]
            assert dict((await session.execute(queries["active gauge"])).all()) == {"waiting": 6}
    finally:
        await db.dispose()


async def test_the_runner_finds_due_runs_in_its_index_however_many_runs_have_ended(database_url):
    """The runner looks for due runs on every round. Runs that have ended are kept, and a new database has no
    statistics: PostgreSQL then read every run ever stored to find the few due ones (4 ms per round at 20,000
    runs in a benchmark, growing with the table). The partial `ix_runs_due` holds only runs with a wake-up time,
    and it is walked in order."""
    from datetime import UTC, datetime, timedelta

    from bot.engine.worker import due_runs
    from bot.store.models import Run
    from bot.store.plans import in_index_order

    db = Database(database_url)
    await migrate.upgrade(db)
    now = datetime.now(UTC)
    try:
        async with db.write() as session:
            event_ids = await _processed_events_of_one_workflow(session, count=5000, now=now)
            going = {index: now - timedelta(seconds=index) for index in (10, 20, 30)}  # due, oldest wake-up first
            await session.execute(insert(Run), [
                {"id": f"r{index:05d}", "team_id": "T1", "event_id": event_id, "workflow": "wf",
                 "workflow_hash": "h" * 64, "channel_id": "C1", "title": "", "context": {}, "card": {},
                 "state": "running" if index in going else "succeeded", "created_at": now - timedelta(hours=1),
                 "finished_at": None if index in going else now, "wake_at": going.get(index)}
                for index, event_id in enumerate(event_ids)])
        async with db.write() as session:
            for skip_locked in ((False,) if db.is_sqlite else (False, True)):
                query = due_runs(now=now, limit=64, skip_locked=skip_locked)
                async with in_index_order(session, postgres=not db.is_sqlite):
                    plan = await _plan_of(session, query, sqlite=db.is_sqlite)
                    found = (await session.execute(query)).scalars().all()
                assert "ix_runs_due" in plan and "Seq Scan" not in plan and "SCAN runs\n" not in plan + "\n", plan
                assert found == ["r00030", "r00020", "r00010"]
    finally:
        await db.dispose()


async def test_the_door_s_backlog_is_exact_up_to_its_limit_without_counting_a_small_one(database_url):
    from datetime import UTC, datetime

    from bot.engine.worker import _backlog_up_to

    db = Database(database_url)
    await migrate.upgrade(db)
    try:
        now = datetime.now(UTC)
        async with db.write() as session:
            ids = await _processed_events_of_one_workflow(session, count=10, now=now)
        async with db.read() as session:
            assert await _backlog_up_to(session, limit=5) == 0
        for pending in ([ids[2], ids[6]], ids[4:], ids):
            async with db.write() as session:
                await session.execute(update(Event).values(processed_at=now))
                await session.execute(update(Event).where(Event.id.in_(pending)).values(processed_at=None))
            for limit in (1, 2, 3, 5, 8, 100):
                async with db.read() as session:
                    counted = await _backlog_up_to(session, limit=limit)
                # Whether the limit is reached is exact; below it, the number may be an upper bound.
                assert (counted >= limit) == (len(pending) >= limit), (pending, limit, counted)
                assert min(len(pending), limit) <= counted <= max(len(pending), limit), (pending, limit, counted)
                if counted >= limit:
                    assert counted == limit
    finally:
        await db.dispose()


async def test_two_processes_storing_the_same_content_in_neighbouring_slices_keep_one(database_url):
    """The copies of an Alertmanager notification sent by an HA pair land in two processes, one each side of a
    slice's end: each looks for the other's id in its own transaction, and only one of them may be stored."""
    from datetime import UTC, datetime

    db, other = Database(database_url), Database(database_url)
    await migrate.upgrade(db)
    inboxes = Inbox(db), Inbox(other)

    def copy(content: int, slice_: int) -> NewEvent:
        return NewEvent(team_id="T1", source="alertmanager", delivery_id=f"c{content}@{slice_}", kind="alert",
                        payload={"content": content}, received_at=datetime.now(UTC), dedupe_group=f"c{content}",
                        duplicate_if_stored=(f"c{content}@{slice_ - 1}", f"c{content}@{slice_ + 1}"),
                        duplicate_window=300.0)

    try:
        for round_ in range(8):  # each round: a batch in each process at once, which may or may not overlap
            contents = range(round_ * 20, round_ * 20 + 20)
            outcomes = await asyncio.gather(*[inboxes[0].store(copy(content, 1)) for content in contents],
                                            *[inboxes[1].store(copy(content, 2)) for content in contents])
            for offset, content in enumerate(contents):
                pair = outcomes[offset], outcomes[len(contents) + offset]
                assert sorted(outcome.duplicate for outcome in pair) == [False, True], (content, pair)
                assert pair[0].event_id == pair[1].event_id
        async with db.read() as session:
            assert await session.scalar(select(func.count()).select_from(Event)) == 160
    finally:
        for inbox in inboxes:
            await inbox.close()
        await db.dispose()
        await other.dispose()
