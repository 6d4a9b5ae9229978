"""Durability across a real process being killed (`kill -9`) and another one started on the same database."""

from __future__ import annotations

import copy
import json

from sqlalchemy import select

from bot.store.db import Database
from bot.store.models import Run, Step
from tests.conftest import ALICE, BOTH_DATABASES, CHANNEL, TEAM, buttons, connection_from, write_workflow
from tests.fakes.http_target import Reply
from tests.procs import ServeProcess, command, post_json

pytestmark = BOTH_DATABASES


def card_with(slack, predicate):
    return next((m for m in slack.channel_messages(TEAM, CHANNEL) if predicate(m)), None)


def thread(slack, card) -> list[str]:
    return [m.text for m in slack.thread(TEAM, CHANNEL, card.ts)]


async def fire(url: str, secret: str, payload: dict, delivery: str) -> int:
    return await post_json(url, json.dumps(payload).encode(), {"Authorization": f"Bearer {secret}",
                                                               "Content-Type": "application/json",
                                                               "X-Request-Id": delivery})


async def kill_once_called(slack, workflows, target, tmp_path, database_url, *, workflow: str, path: str,
                           delivery: str) -> None:
    """A `relaybot serve` that enables `workflow`, gets one webhook, and is killed (SIGKILL) as soon as the
    run's step has called `path`: the step is in flight, its outcome never recorded."""
    process = await ServeProcess(slack=slack, workflows=workflows, database_url=database_url,
                                 log=tmp_path / "serve.log").start()
    try:
        url, secret = connection_from(await command(slack, f"enable {workflow}"), "webhook")
        assert await fire(url, secret, {}, delivery) == 202
        await slack.wait_for(lambda: target.requests_to(path), timeout=15)
    finally:
        process.kill()


async def test_waiting_run_survives_kill_9_and_is_approved_on_the_next_process(
        slack, workflows, target, tmp_path, database_url):
    write_workflow(workflows, "gate", f"""
        name: gate
        on: webhook
        steps:
          - id: before
            uses: http.request
            with: {{url: "{target.url}/before", method: POST}}
          - id: deploy
            approval: required
            uses: http.request
            with: {{url: "{target.url}/deploy", method: POST}}
        """)
    first = await ServeProcess(slack=slack, workflows=workflows, database_url=database_url,
                               log=tmp_path / "serve.log").start()
    try:
        url, secret = connection_from(await command(slack, "enable gate"), "webhook")
        assert await fire(url, secret, {"summary": "ship"}, "d-1") == 202
        card = await slack.wait_for(lambda: card_with(slack, lambda m: "approve" in buttons(m)), timeout=15)
        stale = copy.deepcopy(card)
    finally:
        first.kill()

    second = await ServeProcess(slack=slack, workflows=workflows, database_url=database_url,
                                log=tmp_path / "serve.log").start()
    try:
        # The same delivery again, now at the new process: still one run.
        url = second.url + "/hooks/" + url.rsplit("/", 1)[1]
        assert await fire(url, secret, {"summary": "ship"}, "d-1") == 202
        await slack.click(TEAM, CHANNEL, ALICE, card.ts, "approve", snapshot=stale)
        await slack.wait_for(lambda: any("Run succeeded" in text for text in thread(slack, card)), timeout=20)
    finally:
        second.stop()

    assert len(target.requests_to("/before")) == 1, "a step that finished before the crash ran again"
    assert len(target.requests_to("/deploy")) == 1
    assert len(slack.channel_messages(TEAM, CHANNEL)) == 1
    lines = thread(slack, card)
    order = ["Run `", "*before* started", "*before* succeeded", "waiting for approval", "approved by",
             "*deploy* started", "*deploy* succeeded", "Run succeeded"]
    positions = [next(i for i, line in enumerate(lines) if needle in line) for needle in order]
    assert positions == sorted(positions), lines


async def test_step_in_flight_when_killed_is_taken_over_after_its_lease(
        slack, workflows, target, tmp_path, database_url):
    target.queue("/slow", Reply(delay=6))
    write_workflow(workflows, "slow", f"""
        name: slow
        on: webhook
        steps:
          - id: first
            uses: http.request
            with: {{url: "{target.url}/first", method: POST}}
          - id: slow
            uses: http.request
            timeout: 60s
            with: {{url: "{target.url}/slow", method: PUT}}
        """)
    await kill_once_called(slack, workflows, target, tmp_path, database_url, workflow="slow", path="/slow",
                           delivery="d-2")

    second = await ServeProcess(slack=slack, workflows=workflows, database_url=database_url,
                                log=tmp_path / "serve.log").start()
    try:
        card = slack.channel_messages(TEAM, CHANNEL)[0]
        await slack.wait_for(lambda: any("Run succeeded" in text for text in thread(slack, card)), timeout=30)
    finally:
        second.stop()
    assert len(target.requests_to("/first")) == 1
    assert len(target.requests_to("/slow")) == 2  # at least once: the unfinished attempt is made again
    db = Database(database_url)
    try:
        async with db.read() as session:
            run = (await session.execute(select(Run))).scalar_one()
            steps = list((await session.execute(select(Step).order_by(Step.position))).scalars())
    finally:
        await db.dispose()
    assert run.state == "succeeded"
    assert [(s.step_id, s.state, s.attempt) for s in steps] == [("first", "succeeded", 1), ("slow", "succeeded", 2)]
    assert any("resumed" in text or "*slow* started" in text for text in thread(slack, card))


async def create_cut_short_then_restarted(slack, workflows, target, tmp_path, database_url, *,
                                          delivery: str) -> ServeProcess:
    """A non-repeatable step (POST /create) killed mid-call, and a second process started on the database."""
    target.queue("/create", Reply(delay=6, body={"id": 1}))
    write_workflow(workflows, "create", f"""
        name: create
        on: webhook
        steps:
          - id: create
            title: Create the release
            uses: http.request
            timeout: 60s
            with: {{url: "{target.url}/create", method: POST}}
        """)
    await kill_once_called(slack, workflows, target, tmp_path, database_url, workflow="create", path="/create",
                           delivery=delivery)
    return await ServeProcess(slack=slack, workflows=workflows, database_url=database_url,
                              log=tmp_path / "serve.log").start()


async def test_a_non_idempotent_step_cut_short_asks_a_person_instead_of_repeating(
        slack, workflows, target, tmp_path, database_url):
    second = await create_cut_short_then_restarted(slack, workflows, target, tmp_path, database_url, delivery="d-3")
    try:
        card = await slack.wait_for(lambda: card_with(slack, lambda m: "retry" in buttons(m)), timeout=30)
        lines = await slack.wait_for(lambda: [t for t in thread(slack, card) if "outcome unknown" in t] and
                                     thread(slack, card), timeout=15)
        assert any("*Create the release*: outcome unknown" in line for line in lines)
        await slack.wait_for(lambda: True, timeout=1.5)  # time in which a blind retry would have happened
        assert len(target.requests_to("/create")) == 1
        stale = copy.deepcopy(card)
        await slack.click(TEAM, CHANNEL, ALICE, card.ts, "retry", snapshot=stale)
        await slack.wait_for(lambda: any("Run succeeded" in text for text in thread(slack, card)), timeout=20)
        assert len(target.requests_to("/create")) == 2
        assert any("chose to retry it" in text for text in thread(slack, card))
    finally:
        second.stop()


async def test_a_cancelled_run_is_not_brought_back_by_a_retry_click(slack, workflows, target, tmp_path, database_url):
    """`/relay cancel` of a run whose step's outcome is unknown, then Retry on a card not refreshed yet: the
    click once won, set the run running again and repeated the non-repeatable step."""
    second = await create_cut_short_then_restarted(slack, workflows, target, tmp_path, database_url, delivery="d-4")
    try:
        card = await slack.wait_for(lambda: card_with(slack, lambda m: "retry" in buttons(m)), timeout=30)
        stale = copy.deepcopy(card)
        db = Database(database_url)
        try:
            async with db.read() as session:
                run_id = (await session.execute(select(Run.id))).scalar_one()
            assert "cancelled" in await command(slack, f"cancel {run_id}")
            before = len(slack.responses)
            await slack.click(TEAM, CHANNEL, ALICE, card.ts, "retry", snapshot=stale)
            answer = await slack.wait_for(lambda: slack.responses[before:] and slack.responses[before], timeout=10)
            assert "was cancelled" in answer["text"], answer
            await slack.wait_for(lambda: True, timeout=1.5)  # time in which the step would have started again
            async with db.read() as session:
                run = (await session.execute(select(Run))).scalar_one()
                step = (await session.execute(select(Step))).scalar_one()
        finally:
            await db.dispose()
        assert (run.state, step.state) == ("cancelled", "cancelled")
        assert len(target.requests_to("/create")) == 1
    finally:
        second.stop()
