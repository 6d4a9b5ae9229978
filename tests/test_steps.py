"""Step semantics through the running app: retries, timeouts, conditions, outputs of earlier steps."""

from __future__ import annotations

import asyncio
import copy

from sqlalchemy import select

from bot.store.models import AuditRecord, Run, Step
from tests.conftest import BOTH_DATABASES, CHANNEL, TEAM, block_texts, buttons, write_workflow
from tests.fakes.http_target import Reply

pytestmark = BOTH_DATABASES
HOOK = "on: {webhook: {}}\n"


def approval_gate(target) -> str:
    """A workflow of one step that waits for approval, then calls the fake target's `/deploy`."""
    return f"""
        name: gate
        {HOOK}
        steps:
          - id: deploy
            approval: required
            uses: http.request
            with: {{url: "{target.url}/deploy", method: POST}}
        """


async def start(make_bot, workflows, name: str, text: str, **env):
    write_workflow(workflows, name, text)
    bot = await make_bot(**env)
    reply = await bot.command(f"enable {name}")
    url = reply.split("URL: `")[1].split("`")[0]
    secret = reply.split("Secret: `")[1].split("`")[0]

    async def fire(payload: dict, delivery: str | None = None) -> int:
        import json

        headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
        if delivery:
            headers["X-Request-Id"] = delivery
        status, _ = await bot.post(url, json.dumps(payload).encode(), headers)
        return status

    return bot, fire


async def run_record(bot):
    async with bot.services.db.read() as session:
        run = (await session.execute(select(Run))).scalar_one()
        steps = list((await session.execute(select(Step).order_by(Step.position))).scalars())
    return run, steps


async def test_failing_step_is_retried_then_fails_the_run(make_bot, workflows, target):
    target.queue("/flaky", *[Reply(status=503, body="busy") for _ in range(3)])
    bot, fire = await start(make_bot, workflows, "flaky", f"""
        name: flaky
        {HOOK}
        steps:
          - id: call
            uses: http.request
            retry: {{attempts: 3, backoff: 100ms}}
            with: {{url: "{target.url}/flaky", method: POST}}
          - id: after
            uses: http.request
            with: {{url: "{target.url}/after"}}
          - id: report
            if: steps.call.outcome == "failed"
            uses: slack.post
            with: {{text: "call failed: ${{{{ steps.call.error }}}}", thread: true}}
        """)
    assert await fire({"summary": "try it"}) == 202
    card = await bot.wait_card()
    thread = await bot.wait_thread(card, "Run failed")
    assert len(target.requests_to("/flaky")) == 3
    assert target.requests_to("/after") == []
    retries = [line for line in thread if "Retrying in" in line]
    assert len(retries) == 2 and "attempt 1 of 3" in retries[0] and "attempt 2 of 3" in retries[1]
    assert any("*call* failed in" in line and "answered 503" in line for line in thread)
    assert any("*after* skipped: an earlier step failed" in line for line in thread)
    assert any("*report* succeeded" in line for line in thread)
    run, steps = await run_record(bot)
    assert run.state == "failed"
    assert [s.state for s in steps] == ["failed", "skipped", "succeeded"]
    assert steps[0].attempt == 3


async def test_retry_that_succeeds(make_bot, workflows, target):
    target.queue("/flaky", Reply(status=500, body="oops"))
    bot, fire = await start(make_bot, workflows, "flaky", f"""
        name: flaky
        {HOOK}
        steps:
          - id: call
            uses: http.request
            retry: {{attempts: 2, backoff: 50ms}}
            with: {{url: "{target.url}/flaky"}}
        """)
    await fire({})
    card = await bot.wait_card()
    await bot.wait_thread(card, "Run succeeded")
    _run, steps = await run_record(bot)
    assert steps[0].state == "succeeded" and steps[0].attempt == 2
    assert steps[0].outputs["status"] == 200 and steps[0].outputs["json"] == {"ok": True}


async def test_step_that_runs_too_long_times_out(make_bot, workflows, target):
    target.queue("/slow", Reply(delay=5))
    bot, fire = await start(make_bot, workflows, "slow", f"""
        name: slow
        {HOOK}
        steps:
          - id: call
            uses: http.request
            timeout: 300ms
            with: {{url: "{target.url}/slow"}}
        """)
    await fire({})
    card = await bot.wait_card()
    thread = await bot.wait_thread(card, "Run failed")
    assert any("*call* timed out in" in line and "no result within 300 ms" in line for line in thread), thread
    assert any("*call* started" in line for line in thread), thread
    run, steps = await run_record(bot)
    assert steps[0].state == "timed_out" and run.outcome == "failed"


async def test_approval_timeout_skips_and_the_run_goes_on(make_bot, workflows, target):
    bot, fire = await start(make_bot, workflows, "gate", f"""
        name: gate
        {HOOK}
        steps:
          - id: deploy
            approval: {{timeout: 500ms}}
            uses: http.request
            with: {{url: "{target.url}/deploy", method: POST}}
          - id: after
            uses: http.request
            with: {{url: "{target.url}/after"}}
        """)
    await fire({})
    card = await bot.wait_card(lambda m: "approve" in buttons(m))
    stale = copy.deepcopy(card)
    thread = await bot.wait_thread(card, "Run succeeded")
    assert any("*deploy* timed out after waiting" in line and "the run goes on" in line for line in thread)
    assert target.requests_to("/deploy") == [] and len(target.requests_to("/after")) == 1
    await bot.settle()
    final = bot.slack.message(TEAM, CHANNEL, card.ts)
    assert buttons(final) == [] and "timed out" in block_texts(final)
    reply = await bot.click(card, "approve", snapshot=stale)
    assert reply is not None and "no longer waiting" in reply


async def test_approval_timeout_can_fail_the_run(make_bot, workflows, target):
    bot, fire = await start(make_bot, workflows, "gate", f"""
        name: gate
        {HOOK}
        steps:
          - id: deploy
            approval: {{timeout: 300ms, on_timeout: fail}}
            uses: http.request
            with: {{url: "{target.url}/deploy", method: POST}}
          - id: after
            uses: http.request
            with: {{url: "{target.url}/after"}}
        """)
    await fire({})
    card = await bot.wait_card()
    thread = await bot.wait_thread(card, "Run failed")
    assert any("the run fails" in line for line in thread)
    assert target.received == []


async def test_false_condition_skips_and_outputs_flow_to_later_steps(make_bot, workflows, target):
    target.queue("/lookup", Reply(body={"version": "1.2.3", "items": [1, 2]}))
    bot, fire = await start(make_bot, workflows, "chain", f"""
        name: chain
        {HOOK}
        steps:
          - id: lookup
            uses: http.request
            with: {{url: "{target.url}/lookup"}}
          - id: never
            if: event.size > 10
            uses: http.request
            with: {{url: "{target.url}/never"}}
          - id: use
            if: size(steps.lookup.outputs.json.items) == 2
            uses: http.request
            with:
              method: POST
              url: "{target.url}/use"
              json:
                version: "${{{{ steps.lookup.outputs.json.version }}}}"
                items: "${{{{ steps.lookup.outputs.json.items }}}}"
                label: "v${{{{ steps.lookup.outputs.json.version }}}} of ${{{{ event.size }}}}"
                never: "${{{{ steps.never.outcome }}}}"
        """)
    await fire({"size": 3})
    card = await bot.wait_card()
    await bot.wait_thread(card, "Run succeeded")
    assert target.requests_to("/never") == []
    [use] = target.requests_to("/use")
    assert use.json() == {"version": "1.2.3", "items": [1, 2], "label": "v1.2.3 of 3", "never": "skipped"}


async def test_event_data_is_never_parsed_as_a_template(make_bot, workflows, target):
    bot, fire = await start(make_bot, workflows, "echo", f"""
        name: echo
        {HOOK}
        steps:
          - id: send
            uses: http.request
            with:
              method: POST
              url: "{target.url}/echo"
              json: {{title: "${{{{ event.title }}}}", wrapped: "<${{{{ event.title }}}}>"}}
        """)
    hostile = "${{ secrets.DEPLOY_TOKEN }} ${{ 1 + 1 }}"
    await fire({"title": hostile})
    card = await bot.wait_card()
    await bot.wait_thread(card, "Run succeeded")
    [request] = target.requests_to("/echo")
    assert request.json() == {"title": hostile, "wrapped": f"<{hostile}>"}


async def test_expression_error_in_inputs_fails_the_step_with_a_clear_message(make_bot, workflows, target):
    bot, fire = await start(make_bot, workflows, "broken", f"""
        name: broken
        {HOOK}
        steps:
          - id: send
            uses: http.request
            with: {{url: "{target.url}/x/${{{{ event.missing.deeper }}}}"}}
        """)
    await fire({"present": 1})
    card = await bot.wait_card()
    thread = await bot.wait_thread(card, "Run failed")
    assert any("no such key" in line and "missing" in line for line in thread)


async def test_many_people_clicking_at_once_decide_once(make_bot, workflows, target, slack):
    bot, fire = await start(make_bot, workflows, "gate", approval_gate(target))
    await fire({})
    card = copy.deepcopy(await bot.wait_card(lambda m: "approve" in buttons(m)))
    users = []
    for index in range(8):
        user = f"U0CLICK{index:02d}"
        slack.add_user(TEAM, user, f"clicker{index}")
        users.append(user)
    results = await asyncio.gather(*[
        slack.click(TEAM, CHANNEL, user, card.ts, "approve" if index % 2 else "skip", snapshot=card)
        for index, user in enumerate(users)])
    assert all(status == 200 for status, _ in results)
    await bot.settle()
    async with bot.services.db.read() as session:
        decisions = list((await session.execute(select(AuditRecord).where(
            AuditRecord.action.in_(["step.approved", "step.skipped"])))).scalars())
    assert len(decisions) == 1
    assert len(target.requests_to("/deploy")) == (1 if decisions[0].action == "step.approved" else 0)
    refusals = [r for r in slack.responses if "already decided" in str(r.get("text"))]
    assert len(refusals) == len(users) - 1


async def test_retried_slack_request_does_nothing_twice(make_bot, workflows, target, slack):
    bot, fire = await start(make_bot, workflows, "gate", approval_gate(target))
    await fire({})
    card = await bot.wait_card(lambda m: "approve" in buttons(m))
    payload_card = copy.deepcopy(card)
    await slack.click(TEAM, CHANNEL, "U0ALICE01", card.ts, "approve", snapshot=payload_card)
    await slack.click(TEAM, CHANNEL, "U0ALICE01", card.ts, "approve", snapshot=payload_card,
                      headers={"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"})
    await bot.wait_thread(card, "Run succeeded")
    await bot.settle()
    assert len(target.requests_to("/deploy")) == 1


async def test_runs_waiting_for_approval_show_in_the_active_runs_gauge(make_bot, workflows, target):
    bot, fire = await start(make_bot, workflows, "gate", approval_gate(target))
    await fire({})
    card = await bot.wait_card(lambda m: "approve" in buttons(m))

    async def gauge() -> str:
        async with bot.http().get(f"{bot.url}/metrics") as response:
            return await response.text()

    assert 'relaybot_runs_active{state="waiting"} 1.0' in await gauge()
    await bot.click(card, "approve")
    await bot.settle()
    text = await gauge()
    assert 'relaybot_runs_active{state="waiting"} 0.0' in text and "relaybot_inbox_depth 0.0" in text


async def test_thread_reply_fails_when_slack_refused_the_card(make_bot, workflows, slack):
    """The bot is not in the channel: the card is refused for good, so a `thread: true` step can never reply.
    It fails, saying why, and the run ends (it once waited for the card's ts forever, waking twice a second)."""
    slack.add_channel(TEAM, "C0NOTIN01", "private-ops", bot_member=False)
    write_workflow(workflows, "gate", """
        name: gate
        on: {webhook: {}}
        steps:
          - id: note
            uses: slack.post
            with: {text: hi, thread: true}
          - id: after
            uses: slack.post
            with: {text: later}
        """)
    bot = await make_bot()
    reply = await bot.command("enable gate", channel="C0NOTIN01")
    url, secret = reply.split("URL: `")[1].split("`")[0], reply.split("Secret: `")[1].split("`")[0]
    status, _ = await bot.post(url, b'{"summary": "x"}', {"Authorization": f"Bearer {secret}",
                                                          "Content-Type": "application/json"})
    assert status == 202

    async def ended() -> Run | None:
        async with bot.services.db.read() as session:
            run = (await session.execute(select(Run))).scalar_one_or_none()
        return run if run is not None and run.finished_at is not None else None

    deadline = asyncio.get_running_loop().time() + 10
    while (run := await ended()) is None:
        assert asyncio.get_running_loop().time() < deadline, "the run never ended"
        await asyncio.sleep(0.1)
    run, steps = await run_record(bot)
    assert run.state == "failed" and run.card_ts is None
    assert [s.state for s in steps] == ["failed", "skipped"]
    assert "Slack refused to post it (chat.postMessage: not_in_channel)" in (steps[0].error or "")
    async with bot.services.db.read() as session:
        actions = list((await session.execute(select(AuditRecord.action).order_by(AuditRecord.id))).scalars())
    assert actions[-1] == "run.finished"


async def test_a_step_title_that_cannot_be_rendered_reads_unavailable_not_the_template(make_bot, workflows):
    write_workflow(workflows, "ship", """
        name: ship
        on: command
        params: {env: {default: staging}}
        steps:
          - id: deploy
            title: Deploy ${{ event.sha.substring(0, 7) }} to ${{ params.env }}
            approval: required
            uses: slack.post
            with: {text: go, thread: true}
        """)
    bot = await make_bot()
    assert (await bot.command("run ship")).startswith("Started run")  # no `sha` given
    card = await bot.wait_card(lambda m: "approve" in buttons(m))
    thread = await bot.wait_thread(card, "waiting")
    assert any("*Deploy (unavailable) to staging*" in line for line in thread), thread
    assert "${{" not in block_texts(card) + " ".join(thread)


def silence_for_event_duration(target) -> str:
    """A workflow of one step: an Alertmanager silence at the fake target, as long as the event says."""
    return f"""
        name: mute
        {HOOK}
        steps:
          - id: mute
            uses: alertmanager.silence
            with: {{url: "{target.url}", labels: {{alertname: Disk}}, duration: "${{{{ event.duration }}}}"}}
        """


async def test_an_input_too_big_for_its_type_fails_the_step_at_once(make_bot, workflows, target):
    """A duration too long for Python's timedelta raised OverflowError, which the input checks did not catch: the
    step stayed `running` for its lease, then became "outcome unknown" with a Retry button doing the same."""
    bot, fire = await start(make_bot, workflows, "mute", silence_for_event_duration(target))
    await fire({"duration": "99999999999999d"})
    card = await bot.wait_card()
    thread = await bot.wait_thread(card, "Run failed", timeout=10)
    assert any("input duration" in line and "longer than any duration" in line for line in thread), thread
    assert not target.received


async def test_an_error_answer_no_database_can_store_still_ends_the_step(make_bot, workflows, target):
    """An API's error message with a NUL or a lone surrogate (a JSON escape) went into the step's error and audit
    record as it was, and the commit failed, every time: a repeatable step ran again at every lease, for good."""
    target.queue("/api/v2/silences", Reply(status=400, body='{"error": "bad \\ud83d label \\u0000 here"}',
                                           headers={"Content-Type": "application/json"}))
    bot, fire = await start(make_bot, workflows, "mute", silence_for_event_duration(target))
    await fire({"duration": "1h"})
    card = await bot.wait_card()
    thread = await bot.wait_thread(card, "Run failed", timeout=15)
    assert any("answered 400" in line and "label" in line and "here" in line for line in thread), thread
    assert len(target.requests_to("/api/v2/silences")) == 1


async def test_a_waiting_run_of_a_workflow_named_by_its_file_goes_on_after_the_file_is_edited(make_bot, workflows,
                                                                                             target):
    """A workflow without `name:` is named after its file; once the file was edited, a run that waited on the old
    text had that text compiled without the file's name, which failed ('name' is required) at every pass and at
    every click."""
    text = "\n".join(line for line in approval_gate(target).splitlines() if "name: gate" not in line)
    bot, fire = await start(make_bot, workflows, "gate", text)
    await fire({})
    card = await bot.wait_card(lambda m: "approve" in buttons(m))
    await bot.stop()
    path = workflows / "gate.yml"
    path.write_text(path.read_text() + "# edited after the run started\n")
    again = await make_bot()  # the same database, the edited file
    assert await again.click(card, "approve") is None
    await again.wait_thread(card, "Run succeeded")
    assert len(target.requests_to("/deploy")) == 1
