"""`on.poll` and `on.schedule` in workflow files (every problem with its line), and the schedule's due times."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot.engine.loader import compile_workflow
from bot.engine.triggers import schedule
from bot.engine.triggers.config import PollTrigger, ScheduleTrigger
from bot.engine.triggers.poll import backoff, delivery_id
from bot.errors import WorkflowError

BAD = """\
name: bad
on:
  poll:
    every: 5m
    request:
      url: https://api.example.com/repos/${{ params.repo }}/releases
      headers:
        Authorization: "Bearer ${{ secrets.TOKEN }}"
        X-Event: "${{ event.x }}"
        X-Broken: "${{ 1 + }}"
    items: response.json.filter(r, r.draft == false
    key: item.id + steps.a.outcome
  schedule:
    cron: "61 9 * * 1-5"
    timezone: Europe/Nowhere
steps: []
"""


def problems(text: str) -> list[str]:
    with pytest.raises(WorkflowError) as caught:
        compile_workflow(textwrap.dedent(text), file="w.yml")
    return [str(problem) for problem in caught.value.problems]


def test_each_problem_of_poll_and_schedule_has_its_line():
    found = problems(BAD)
    assert found[0].startswith("w.yml:9: ") and "`event.x`: unknown name event" in found[0]
    assert found[1].startswith("w.yml:10: ") and "bad expression: `1 +`" in found[1]
    assert found[2].startswith("w.yml:11: ") and "bad expression" in found[2] and "missing ')'" in found[2]
    assert found[3].startswith("w.yml:12: ") and "unknown name steps (here you can use item, params, response)" \
        in found[3]
    assert found[4].startswith("w.yml:14: ") and "'61 9 * * 1-5' is not a valid cron string" in found[4]
    assert found[5].startswith("w.yml:15: ") and "unknown time zone 'Europe/Nowhere'" in found[5]
    assert len(found) == 6


def test_poll_limits_and_shapes():
    found = problems("""
        name: p
        on:
          poll:
            every: 2s
            request: {url: ftp://example.com/x, json: {a: 1}, body: text, method: DELETE}
            items: response.json
            key: item.id
          schedule: {cron: "0 9 * *"}
        """)
    text = "\n".join(found)
    assert "poll at most every 10s" in text
    assert "'ftp://example.com/x' is not an http(s) URL" in text
    assert "Input should be 'GET' or 'POST'" in text
    assert "a cron string has five fields" in text


def test_secrets_only_in_the_request_and_response_only_after_it():
    found = problems("""
        name: p
        on:
          poll:
            every: 1m
            request: {url: "https://x.example/${{ response.status }}"}
            items: secrets.LIST
            key: item.id
        """)
    assert "`response.status`: unknown name response (here you can use params, secrets)" in found[0]
    assert "`secrets.LIST`: unknown name secrets (here you can use params, response)" in found[1]


def test_a_valid_poll_compiles_its_parts_once():
    workflow = compile_workflow(textwrap.dedent("""
        name: p
        params: {repo: {default: acme/api}}
        on:
          poll:
            every: 90s
            request:
              url: "https://api.example.com/repos/${{ params.repo }}/releases"
              query: {per_page: 10, draft: false}
              json: {token: "${{ secrets.T }}", n: 1}
            items: response.json.filter(r, !r.draft)
            key: item.id
          schedule: {cron: "@daily", timezone: Europe/Berlin}
        """), file="p.yml")
    poll = workflow.triggers["poll"]
    assert isinstance(poll, PollTrigger) and poll.every == timedelta(seconds=90)
    assert poll.request.query == {"per_page": "10", "draft": "false"}
    rendered = poll.compiled_request.render({"params": {"repo": "a/b"}, "secrets": {"T": "s3cret"}})
    assert rendered["url"] == "https://api.example.com/repos/a/b/releases"
    assert rendered["json"] == {"token": "s3cret", "n": 1}
    assert poll.items_expression.evaluate({"response": {"json": [{"id": 1, "draft": True}, {"id": 2, "draft": False}]},
                                           "params": {}}) == [{"id": 2, "draft": False}]
    schedule_config = workflow.triggers["schedule"]
    assert isinstance(schedule_config, ScheduleTrigger) and schedule_config.cron == "@daily"
    # What is polled decides the baseline; how often does not.
    slower = PollTrigger.model_validate({**poll.model_dump(by_alias=True), "every": "5m"})
    other = PollTrigger.model_validate({**poll.model_dump(by_alias=True), "key": "item.name"})
    assert slower.fingerprint() == poll.fingerprint() != other.fingerprint()


def test_relaybot_validate_names_file_and_line(tmp_path: Path):
    (tmp_path / "bad.yml").write_text(BAD)
    result = subprocess.run([sys.executable, "-m", "bot", "validate", str(tmp_path)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert f"{tmp_path / 'bad.yml'}:14: on.schedule: '61 9 * * 1-5' is not a valid cron string" in result.stderr
    assert f"{tmp_path / 'bad.yml'}:15: on.schedule: unknown time zone 'Europe/Nowhere'" in result.stderr
    assert f"{tmp_path / 'bad.yml'}:11: on.poll: bad expression" in result.stderr


BERLIN_WEEKDAYS = ScheduleTrigger(cron="0 9 * * 1-5", timezone="Europe/Berlin")


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def test_due_times_follow_the_time_zone_across_daylight_saving():
    # Friday 27 March 2026 09:00 CET is 08:00 UTC; Monday 30 March 09:00 CEST is 07:00 UTC.
    assert schedule.next_due(BERLIN_WEEKDAYS, utc(2026, 3, 26, 8, 0)) == utc(2026, 3, 27, 8, 0)
    assert schedule.next_due(BERLIN_WEEKDAYS, utc(2026, 3, 27, 8, 0)) == utc(2026, 3, 30, 7, 0)
    assert schedule.latest_due(BERLIN_WEEKDAYS, utc(2026, 3, 30, 7, 0)) == utc(2026, 3, 30, 7, 0)
    assert schedule.latest_due(BERLIN_WEEKDAYS, utc(2026, 3, 30, 6, 59)) == utc(2026, 3, 27, 8, 0)


def test_a_repeated_wall_clock_time_fires_once_and_a_skipped_one_after_the_gap():
    nightly = ScheduleTrigger(cron="30 2 * * *", timezone="Europe/Berlin")
    # 25 October 2026: 02:30 happens at 00:30 UTC (CEST) and again at 01:30 UTC (CET); only the first counts.
    assert schedule.next_due(nightly, utc(2026, 10, 24, 12, 0)) == utc(2026, 10, 25, 0, 30)
    assert schedule.next_due(nightly, utc(2026, 10, 25, 0, 30)) == utc(2026, 10, 26, 1, 30)
    assert schedule.latest_due(nightly, utc(2026, 10, 25, 2, 0)) == utc(2026, 10, 25, 0, 30)
    # 29 March 2026: 02:30 does not exist; it fires at 03:00 CEST (01:00 UTC).
    assert schedule.next_due(nightly, utc(2026, 3, 28, 12, 0)) == utc(2026, 3, 29, 1, 0)


def test_plan_fires_the_latest_missed_time_within_grace_only():
    every_ten = ScheduleTrigger(cron="*/10 * * * *")
    grace = timedelta(minutes=15)
    on_time = schedule.plan(every_ten, due=utc(2026, 1, 1, 9, 0), now=utc(2026, 1, 1, 9, 0, 2), grace=grace)
    assert on_time == schedule.Plan(fire_for=utc(2026, 1, 1, 9, 0), missed_from=None,
                                    next_at=utc(2026, 1, 1, 9, 10))
    late = schedule.plan(every_ten, due=utc(2026, 1, 1, 9, 0), now=utc(2026, 1, 1, 9, 34), grace=grace)
    assert late.fire_for == utc(2026, 1, 1, 9, 30) and late.missed_from == utc(2026, 1, 1, 9, 0)
    daily = ScheduleTrigger(cron="0 9 * * *")
    too_late = schedule.plan(daily, due=utc(2026, 1, 1, 9, 0), now=utc(2026, 1, 1, 9, 16), grace=grace)
    assert too_late.fire_for is None and too_late.missed_from == utc(2026, 1, 1, 9, 0)
    assert too_late.next_at == utc(2026, 1, 2, 9, 0)
    # A retry after an unexpected failure is due at a time of its own (a minute's backoff, not a cron time): it
    # fires the cron time it retries, under that time's delivery id, never a made-up 09:01:00.5.
    retry = schedule.plan(daily, due=utc(2026, 1, 1, 9, 1, 0, 500000), now=utc(2026, 1, 1, 9, 1, 1), grace=grace)
    assert retry == schedule.Plan(fire_for=utc(2026, 1, 1, 9, 0), missed_from=None, next_at=utc(2026, 1, 2, 9, 0))


def test_first_due_counts_from_the_enable_only_when_it_was_moments_ago():
    daily = ScheduleTrigger(cron="0 9 * * *")
    grace = timedelta(minutes=15)
    now = utc(2026, 1, 1, 9, 0, 1)
    assert schedule.first_due(daily, subscribed_at=utc(2026, 1, 1, 8, 59, 59), now=now, grace=grace) == \
        utc(2026, 1, 1, 9, 0)
    assert schedule.first_due(daily, subscribed_at=utc(2025, 6, 1), now=now, grace=grace) == utc(2026, 1, 2, 9, 0)
    assert schedule.first_due(daily, subscribed_at=utc(2027, 1, 1), now=now, grace=grace) == utc(2026, 1, 2, 9, 0)


def test_poll_backoff_doubles_up_to_an_hour_and_delivery_ids_stay_short():
    every = timedelta(minutes=5)
    assert [backoff(every, n) for n in (1, 2, 3, 4, 50)] == [timedelta(minutes=m) for m in (10, 20, 40, 60, 60)]
    assert backoff(timedelta(hours=2), 3) == timedelta(hours=2)
    assert delivery_id(7, "v1.2.3") == "7:v1.2.3"
    long_id = delivery_id(7, "x" * 500)
    assert len(long_id) <= 200 and long_id.startswith("7:sha256:") and long_id != delivery_id(7, "y" * 500)
