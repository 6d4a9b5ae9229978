"""Two `relaybot serve` processes on one database (PostgreSQL, and one SQLite file), one of them killed with
SIGKILL mid-way."""

from __future__ import annotations

import asyncio
import copy
import json
import re
from collections import Counter

import aiohttp
import pytest
from sqlalchemy import func, select

from bot.store.db import Database
from bot.store.models import AuditRecord, Run
from tests.conftest import BOTH_DATABASES, CHANNEL, TEAM, buttons, connection_from, write_workflow
from tests.procs import ServeProcess, command

DELIVERIES = 500


def run_id_of(message) -> str | None:
    match = re.search(r"run `(R[0-9A-Z]+)`", json.dumps(message.blocks or []))
    return match.group(1) if match else None


def write_work_workflow(workflows, target) -> None:
    """`work`: a webhook starts one step that PUTs `/work/<event.n>` at the fake target."""
    write_workflow(workflows, "work", f"""
        name: work
        on: webhook
        steps:
          - id: work
            uses: http.request
            with: {{url: "{target.url}/work/${{{{ event.n }}}}", method: PUT}}
        """)


@BOTH_DATABASES
async def test_two_processes_share_the_work_and_survive_a_kill(slack, workflows, target, tmp_path, database_url):
    write_work_workflow(workflows, target)
    write_workflow(workflows, "gate", f"""
        name: gate
        on: command
        steps:
          - id: deploy
            approval: required
            uses: http.request
            with: {{url: "{target.url}/deploy", method: POST}}
        """)
    log = tmp_path / "serve.log"
    first = await ServeProcess(slack=slack, workflows=workflows, database_url=database_url, log=log).start()
    second = await ServeProcess(slack=slack, workflows=workflows, database_url=database_url, log=log).start()
    processes = [first, second]
    try:
        url, secret = connection_from(await command(slack, "enable work"), "webhook")
        path = "/hooks/" + url.rsplit("/", 1)[1]
        await command(slack, "enable gate")

        # 100 people click Approve on one card at once, their clicks spread over both processes.
        await command(slack, "run gate")
        card = copy.deepcopy(await slack.wait_for(
            lambda: next((m for m in slack.channel_messages(TEAM, CHANNEL) if "approve" in buttons(m)), None)))
        clickers = [f"U0C{index:06d}" for index in range(100)]
        for user in clickers:
            slack.add_user(TEAM, user, user.lower())
        payloads = [slack.block_actions_payload(TEAM, CHANNEL, user, card.ts, "approve", snapshot=card)
                    for user in clickers]

        async def click(index: int) -> int:
            slack.bot_url = processes[index % 2].url
            body = ("payload=" + json.dumps(payloads[index])).encode()
            from bot.emulator.webapi import sign

            headers = {"Content-Type": "application/x-www-form-urlencoded", **sign(slack.signing_secret, body)}
            async with aiohttp.ClientSession() as session, session.post(
                    f"{processes[index % 2].url}/slack/events", data=body, headers=headers) as response:
                return response.status

        statuses = await asyncio.gather(*[click(index) for index in range(100)])
        assert statuses == [200] * 100
        await slack.wait_for(lambda: len(target.requests_to("/deploy")) == 1, timeout=30)

        # 500 deliveries, each sent twice, to either process; one process is killed half-way.
        sent: Counter[int] = Counter()
        alive = [first, second]
        semaphore = asyncio.Semaphore(16)

        async def deliver(n: int, attempt: int) -> None:
            body = json.dumps({"n": n, "summary": f"item {n}"}).encode()
            headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json",
                       "X-Request-Id": f"delivery-{n}"}
            async with semaphore, aiohttp.ClientSession() as session:
                for hop in range(6):
                    process = alive[(n + attempt + hop) % len(alive)]
                    try:
                        async with session.post(process.url + path, data=body, headers=headers) as response:
                            if response.status == 202:
                                sent[n] += 1
                                return
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.05)  # that process is gone: the sender tries again elsewhere
                raise AssertionError(f"delivery {n} was never accepted")

        first_half = [deliver(n, attempt) for n in range(DELIVERIES // 2) for attempt in (0, 1)]
        await asyncio.gather(*first_half)
        first.kill()
        alive.remove(first)
        second_half = [deliver(n, attempt) for n in range(DELIVERIES // 2, DELIVERIES) for attempt in (0, 1)]
        await asyncio.gather(*second_half)
        assert len(sent) == DELIVERIES and set(sent.values()) == {2}

        async def finished() -> int:
            async with db.read() as session:
                return await session.scalar(select(func.count()).select_from(Run).where(
                    Run.workflow == "work", Run.state == "succeeded")) or 0

        db = Database(database_url)
        try:
            for _ in range(600):
                if await finished() == DELIVERIES:
                    break
                await asyncio.sleep(0.2)
            assert await finished() == DELIVERIES
            await slack.wait_for(lambda: len([m for m in slack.channel_messages(TEAM, CHANNEL)]) >= DELIVERIES + 1,
                                 timeout=60)
            async with db.read() as session:
                runs = await session.scalar(select(func.count()).select_from(Run).where(Run.workflow == "work"))
                decisions = await session.scalar(select(func.count()).select_from(AuditRecord).where(
                    AuditRecord.action == "step.approved"))
                finished_steps = Counter((await session.execute(
                    select(AuditRecord.run_id).where(AuditRecord.action == "step.finished"))).scalars())
        finally:
            await db.dispose()
        assert runs == DELIVERIES
        assert decisions == 1
        assert set(finished_steps.values()) == {1}, "a step was committed twice"
        worked = {int(request.path.rsplit("/", 1)[1]) for request in target.received
                  if request.path.startswith("/work/")}
        assert worked == set(range(DELIVERIES))

        # At the fake Slack: one card per run, and no thread reply twice.
        await asyncio.sleep(1.0)
        cards = Counter(run_id_of(m) for m in slack.channel_messages(TEAM, CHANNEL))
        assert len(cards) == DELIVERIES + 1 and set(cards.values()) == {1}, cards.most_common(3)
        for message in slack.channel_messages(TEAM, CHANNEL):
            replies = Counter(m.text for m in slack.thread(TEAM, CHANNEL, message.ts))
            assert all(count == 1 for count in replies.values()), replies
    finally:
        for process in processes:
            process.stop()


@pytest.mark.parametrize("database_backend", ["postgresql"], indirect=True)
async def test_connections_the_database_closed_are_replaced_before_anything_notices(make_bot, workflows, target,
                                                                                   database_url, caplog):
    """A failover, a server restart or a proxy's idle timeout closes every pooled connection: the next webhooks
    are still stored and answered 202 at once, their runs do their work and post their cards, and no transaction
    fails on a dead connection meanwhile. (Without `pool_pre_ping` the door answered 500 here, and rounds of the
    engine and the outbox failed.)"""
    import logging

    import asyncpg

    from tests.conftest import POSTGRES_ADMIN_DSN

    write_work_workflow(workflows, target)
    bot = await make_bot()
    url, secret = connection_from(await bot.command("enable work"), "webhook")
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}

    async def deliver(n: int) -> None:
        status, _ = await bot.post(url, json.dumps({"n": n}).encode(), {**headers, "X-Request-Id": f"d-{n}"})
        assert status == 202

    await deliver(0)
    await bot.slack.wait_for(lambda: len(bot.cards()) == 1, timeout=10)
    await bot.settle()  # no transaction open: what follows checks out connections that sat in the pool
    admin = await asyncpg.connect(POSTGRES_ADMIN_DSN)
    try:
        closed = await admin.fetch("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                                   database_url.rsplit("/", 1)[1])
    finally:
        await admin.close()
    assert closed, "the bot had connections open"
    await asyncio.gather(*(deliver(n) for n in range(1, 6)))  # at once: before a background loop trips over one
    await bot.slack.wait_for(lambda: len(bot.cards()) == 6, timeout=20)
    await bot.slack.wait_for(lambda: len([r for r in target.received if r.path.startswith("/work/")]) == 6,
                             timeout=20)
    assert sorted(r.path for r in target.received if r.path.startswith("/work/")) == [f"/work/{n}" for n in range(6)]
    failures = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert failures == []


@BOTH_DATABASES
async def test_a_process_on_a_host_with_a_long_name_still_takes_work(make_bot, workflows, target, monkeypatch):
    """The lease owner was `host:pid:random` whole; a cloud instance's or a pod's host name made it longer than
    its column, PostgreSQL refused every claim, and webhooks were accepted but never became runs."""
    import socket

    monkeypatch.setattr(socket, "gethostname", lambda: "i-0123456789abcdef0.ap-southeast-1.compute.internal-pod-7f9c")
    write_workflow(workflows, "hook", f"""
        name: hook
        on: webhook
        steps:
          - id: call
            uses: http.request
            with: {{url: "{target.url}/called"}}
        """)
    bot = await make_bot()
    url, secret = connection_from(await bot.command("enable hook"), "webhook")
    status, _ = await bot.post(url, b'{"summary": "from a long-named host"}', {"Authorization": f"Bearer {secret}"})
    assert status == 202
    card = await bot.wait_card()
    await bot.wait_thread(card, "Run succeeded")
    assert len(target.requests_to("/called")) == 1
