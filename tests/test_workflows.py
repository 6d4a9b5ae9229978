"""The workflow format, CEL expressions, `${{ }}` templates and `relaybot validate`."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.engine.expressions import compile_expression, compile_template, compile_value, step_references
from bot.engine.loader import Catalog, compile_workflow
from bot.engine.workflow import parse_duration
from bot.errors import ExpressionError, WorkflowError
from integrations.registry import ACTIONS
from tests.conftest import ROOT, SHARED

SPEC_EXAMPLE = (SHARED / "SPEC.md").read_text().split("```yaml")[1].split("```")[0]


def problems(text: str) -> list[str]:
    with pytest.raises(WorkflowError) as caught:
        compile_workflow(textwrap.dedent(text).lstrip(), file="w.yml")
    return [str(problem) for problem in caught.value.problems]


def test_the_spec_example_compiles():
    workflow = compile_workflow(SPEC_EXAMPLE, file="spec.yml")
    assert workflow.name == "deploy-on-merge"
    assert [step.id for step in workflow.steps] == ["deploy", "comment"]
    assert workflow.steps[0].needs_approval and workflow.steps[0].model.timeout == timedelta(minutes=10)
    assert workflow.steps[0].model.retry.attempts == 3
    assert workflow.steps[0].approvers.users == ["U012ABCDEF"] and not workflow.steps[0].approvers.allow_self
    assert list(workflow.triggers) == ["github"]


def test_bare_on_key_is_not_true():
    workflow = compile_workflow("name: x\non:\n  webhook:\nsteps: []\n", file="x.yml")
    assert list(workflow.triggers) == ["webhook"]
    assert list(compile_workflow("on: [webhook, github]\n", file="y.yml", default_name="y").triggers) == [
        "webhook", "github"]


def test_every_problem_is_reported_with_its_line():
    found = problems("""
        name: x
        on:
          github: {events: [push], bogus: 1}
          nope: {}
        if: event.a ==
        card:
          title: "${{ steps.zzz.outcome }}"
        steps:
          - id: a
            uses: http.request
            with: {url: ftp://x, method: POST, extra: 1}
          - id: b
            if: steps.c.outcome == "x" && params.nope == 1
            uses: nope.x
          - id: c
            uses: slack.post
            with: {text: "${{ steps.c.outputs }} ${{ secrets.X }}"}
            timeout: 10x
          - id: d
            if: steps.d.outcome == "succeeded"
            uses: slack.post
            with: {text: "${{ steps.d.outputs.ts }}"}
    """)
    text = "\n".join(found)
    expected = [
        "w.yml:3: on.github: unknown key 'bogus'",
        "w.yml:4: unknown trigger 'nope'",
        "w.yml:5: bad expression: `event.a ==`",
        "w.yml:7: `steps.zzz.outcome`: unknown step id 'zzz'",
        "w.yml:11: http.request has no input 'extra'",
        "w.yml:11: http.request input 'url': 'ftp://x' does not have the expected form: an http or https URL",
        "w.yml:13: `steps.c.outcome == \"x\" && params.nope == 1`: step 'c' has not run yet here",
        "w.yml:13: `steps.c.outcome == \"x\" && params.nope == 1`: unknown parameter 'nope'",
        "w.yml:14: unknown action 'nope.x'",
        "w.yml:18: steps.2.timeout: '10x' is not a duration",
        "w.yml:20: `steps.d.outcome == \"succeeded\"`: step 'd' has not run yet here",
    ]
    for needle in expected:
        assert needle in text, f"{needle!r} missing from:\n{text}"
    lines = [int(problem.split(":")[1]) for problem in found]
    assert lines == sorted(lines)


def test_a_step_that_fails_its_schema_still_has_its_expressions_checked():
    found = "\n".join(problems("""
        name: x
        on: webhook
        card:
          title: "${{ steps.b.outcome }}"
        steps:
          - id: a
            uses: slack.post
            with: {text: hi}
          - id: b
            timeout: 10x
            if: event.a ==
            title: "${{ nope.x }}"
            uses: slack.post
            with: {text: "${{ steps.b.outputs }} ${{ params.missing }}"}
          - id: c
            if: steps.b.outcome == "succeeded"
            uses: slack.post
            with: {text: "${{ steps.b.outputs.ts }}"}
    """))
    assert "w.yml:10: steps.1.timeout: '10x' is not a duration" in found
    assert "w.yml:11: bad expression: `event.a ==`" in found
    assert "w.yml:12: bad expression: `nope.x`: unknown name nope" in found
    assert "w.yml:14: `params.missing`: unknown parameter 'missing'" in found
    assert "unknown step id" not in found  # b is a step of the file, left out only for its timeout


def test_missing_inputs_and_secrets_outside_inputs():
    found = "\n".join(problems("""
        name: x
        on: webhook
        card: {title: "${{ secrets.TOKEN }}"}
        steps:
          - id: a
            uses: github.comment
            with: {repo: acme/api}
    """))
    assert "w.yml:3: `secrets.TOKEN`: `secrets` is only available in steps' inputs" in found
    assert "github.comment needs the input 'number'" in found and "needs the input 'token'" in found


def test_yaml_errors_and_shapes():
    assert problems("name: [unclosed\n")[0].startswith("w.yml:2: not valid YAML")
    assert problems("- just\n- a list\n") == ["w.yml:1: a workflow is a YAML mapping"]
    assert problems("name: Deploy API\non: webhook\nsteps: [{id: 2nd, uses: slack.post, with: {text: hi}}]\n") == [
        "w.yml:1: name: 'Deploy API' does not have the expected form: lowercase letters, digits, - and _, starting "
        "with a letter or digit, at most 63 characters",
        "w.yml:3: steps.0.id: '2nd' does not have the expected form: letters, digits and _, not starting with a "
        "digit, at most 63 characters"]
    assert "a workflow needs at least one trigger" in problems("name: x\nsteps: []\n")[0]
    assert problems("""
        name: x
        on: webhook
        steps:
          - {id: a, uses: slack.post, with: {text: hi}}
          - id: b
            uses: nope.x
          - id: a
            uses: slack.post
            with: {text: hi}
    """) == ["w.yml:6: unknown action 'nope.x' (known: " + ", ".join(sorted(ACTIONS)) + ")",
             "w.yml:7: step id 'a' is used twice"]  # at the repeated id, and the rest is still checked


def test_catalog_refuses_duplicate_names(tmp_path: Path):
    (tmp_path / "a.yml").write_text("name: same\non: webhook\n")
    (tmp_path / "b.yml").write_text("name: same\non: webhook\n")
    with pytest.raises(WorkflowError) as caught:
        Catalog.load([tmp_path])
    assert "already used by" in str(caught.value)


def test_durations():
    assert parse_duration("1h30m") == timedelta(minutes=90)
    assert parse_duration("250ms") == timedelta(milliseconds=250)
    assert parse_duration(45) == timedelta(seconds=45)
    for bad in ("", "10", "m", "5 minutes", "1h-2m"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_expressions_are_cel_and_reject_unknown_names():
    assert compile_expression('event.a == "b" && size(event.list) > 1').truthy({"event": {"a": "b", "list": [1, 2]}})
    with pytest.raises(ExpressionError, match="unknown name os"):
        compile_expression("os.system('x')")
    with pytest.raises(ExpressionError):
        compile_expression("event.a == ")
    assert compile_expression("event.items.exists(x, x > 2)").truthy({"event": {"items": [1, 3]}})
    assert step_references('steps.deploy.outcome == "steps.fake" && steps["comment"].outputs.id > 0') == {
        "deploy", "comment"}


def test_templates_keep_types_when_alone_and_stringify_otherwise():
    context = {"event": {"n": 3, "items": [1, 2], "flag": True, "nothing": None, "map": {"a": 1}}}
    assert compile_template("${{ event.n }}").render(context) == 3
    assert compile_template("${{ event.items }}").render(context) == [1, 2]
    assert compile_template("n=${{ event.n }} f=${{ event.flag }} x=${{ event.nothing }}").render(context) == \
        "n=3 f=true x="
    assert compile_template("${{ event.map }}!").render(context) == '{"a":1}!'
    assert compile_template('${{ "}}" + "x" }}').render(context) == "}}x"
    with pytest.raises(ExpressionError, match="never closed"):
        compile_template("${{ event.n ")


@given(st.text().filter(lambda text: "${{" not in text))
def test_text_without_templates_renders_to_itself(text):
    assert compile_value({"k": [text]}).render({}) == {"k": [text]}


@given(st.text(max_size=50))
def test_values_are_inserted_never_parsed(value):
    template = compile_template("before ${{ event.v }} after")
    assert template.render({"event": {"v": value}}) == f"before {value} after"
    assert compile_template("${{ event.v }}").render({"event": {"v": value}}) == value


def run_validate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bot", "validate", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, check=False)


def test_validate_cli_prints_every_problem_and_fails(tmp_path: Path):
    (tmp_path / "good.yml").write_text("name: good\non: webhook\n"
                                       "steps:\n  - {id: a, uses: slack.post, with: {text: hi}}\n")
    (tmp_path / "bad.yml").write_text("name: bad\non: webhook\nsteps:\n  - id: a\n    uses: nope.x\n"
                                      "  - id: b\n    if: steps.zz.outcome\n    uses: slack.post\n"
                                      "    with: {text: hi}\n")
    result = run_validate(str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1
    assert f"{tmp_path / 'bad.yml'}:5: unknown action 'nope.x'" in result.stderr
    assert f"{tmp_path / 'bad.yml'}:7: `steps.zz.outcome`: unknown step id 'zz'" in result.stderr
    assert "2 problems in 2 files" in result.stderr
    ok = run_validate(str(tmp_path / "good.yml"), cwd=tmp_path)
    assert ok.returncode == 0 and "1 workflow OK" in ok.stdout
    (tmp_path / "empty").mkdir()
    nothing = run_validate(str(tmp_path / "empty"), cwd=tmp_path)  # the wrong directory, most likely
    assert nothing.returncode == 1 and f"no workflow files (*.yml, *.yaml) in {tmp_path / 'empty'}" in nothing.stderr


def test_the_example_workflows_are_valid():
    result = run_validate(str(ROOT / "workflows"), cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_a_comment_that_cuts_off_a_template_is_reported():
    found = problems("""
        name: x
        on: webhook
        steps:
          - id: a
            title: Acknowledge incident #${{ event.number }}
            uses: slack.post
            with: {text: "fine #${{ event.number }}"}
    """)
    assert found == ["w.yml:5: ` #` starts a YAML comment here, which cuts off the `${{ }}` after it: put the "
                     "whole value in quotes"]


def test_a_poll_naming_an_undeclared_parameter_is_reported():
    found = problems("""
        name: x
        params:
          repo: {default: "a/b"}
        on:
          poll:
            every: 1m
            request: {url: "https://api.example.com/${{ params.repoo }}"}
            items: response.json
            key: item.id
    """)
    assert found == ["w.yml:5: `params.repoo`: unknown parameter 'repoo' (declare it under params:)"]


_json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
_json = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.sampled_from(["a", "b", "c_1"]), inner, max_size=3), max_leaves=12)


@given(payload=st.dictionaries(st.sampled_from(["a", "b", "c_1"]), _json, max_size=3),
       path=st.lists(st.sampled_from(["a", "b", "c_1"]), min_size=1, max_size=4))
def test_field_paths_give_what_cel_gives(payload, path):
    """Field paths are looked up without CEL when they can be; the answer (or the error) must be CEL's."""
    source = ".".join(["event", *path])
    fast = compile_expression(source)
    assert fast.path is not None
    through_cel = dataclasses.replace(fast, path=None)

    def outcome(expression):
        try:
            return "value", expression.evaluate({"event": payload})
        except ExpressionError as exc:
            return "error", str(exc)

    assert outcome(fast) == outcome(through_cel)


def test_only_plain_field_paths_skip_cel():
    assert compile_expression("event . a.b").path == ("event", "a", "b")
    for source in ("event.a == 1", "event['a']", "true", "size(event)", "event.a.exists(x, x)"):
        assert compile_expression(source).path is None


_names = st.sampled_from(["a", "b", "c_1"])
_path_text = st.lists(_names, min_size=0, max_size=3).map(lambda names: ".".join(["event", *names]))
_expressions = st.one_of(
    _path_text,
    _path_text.map(lambda path: f"has({path}.a)" if path != "event" else "has(event.a)"),
    _path_text.map(lambda path: f"size({path})"),
    _path_text.map(lambda path: f'{path} == "x" || {path} == 1'),
    _path_text.map(lambda path: f"{path}.exists(k, k == 'a')"),
    _path_text.map(lambda path: f'{path}["a"]'),
    _path_text.map(lambda path: f'{path}.startsWith("x")'),
    _path_text.map(lambda path: f"{path}.filter(event, event == 'a')"),  # CEL iterates maps in no set order
    st.tuples(_path_text, _path_text).map(lambda pair: f"[{pair[0]}, {pair[1]}]"),
    st.tuples(_path_text, _path_text).map(lambda pair: f"{pair[0]} . {pair[1].removeprefix('event.')}"),
)


@given(payload=st.dictionaries(_names, _json, max_size=3), source=_expressions)
def test_expressions_read_only_what_they_name_and_give_what_cel_gives(payload, source):
    """An expression is handed only the parts of the event it reads; the answer (or the error) must be the one
    CEL gives with the whole event."""
    try:
        expression = compile_expression(source)
    except ExpressionError:
        return
    whole = dataclasses.replace(expression, path=None, reads=None)

    def outcome(candidate):
        try:
            return "value", candidate.evaluate({"event": payload, "params": {"p": 1}})
        except ExpressionError as exc:
            return "error", str(exc)

    assert outcome(expression) == outcome(whole)


def test_what_an_expression_reads():
    assert compile_expression('event.action == "opened"').reads == {"event": (("action",),)}
    assert compile_expression("event.items.exists(x, x > 2)").reads == {"event": (("items",),)}
    assert compile_expression('event["a"]').reads == {"event": ((),)}
    assert compile_expression("size(event.a) + size(params)").reads == {"event": (("a",),), "params": ((),)}
    assert compile_expression('event.a == "//"').reads is not None
    assert compile_expression("event.a // a comment\n == 1").reads is None


def test_run_ids_are_r_and_nine_crockford_characters_drawn_evenly():
    import re
    from collections import Counter

    from bot.ids import new_run_id, normalize_run_id

    ids = [new_run_id() for _ in range(4000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"R[0-9A-HJKMNP-TV-Z]{9}", run_id) for run_id in ids)
    assert all(normalize_run_id(run_id.lower()) == run_id for run_id in ids[:100])
    counts = Counter(character for run_id in ids for character in run_id[1:])
    assert len(counts) == 32 and min(counts.values()) > 0.7 * 36000 / 32  # each of the 32 about equally often


def test_a_top_level_problem_does_not_hide_the_rest_of_the_file():
    """A parameter or key that fails its schema is reported, and the file is still checked without it: one run
    of `relaybot validate` shows every problem (it once stopped at the top level's)."""
    found = problems("""
        name: busy
        params:
          env: {default: prod, choices: [staging, production]}
          region: {default: eu}
        approvers: {users: nobody}
        on:
          schedule: {cron: "61 * * * *"}
        if: params.env == "staging" && params.region ==
        steps:
          - id: a
            uses: nope.x
          - id: b
            uses: slack.post
            with: {text: "${{ params.env }} ${{ params.nosuch }}"}
        """)
    expected = ["w.yml:3: params.env: default 'prod'", "w.yml:5: approvers.users: ", "w.yml:7: on.schedule: '61",
                "w.yml:8: bad expression: ", "w.yml:11: unknown action 'nope.x'", "w.yml:14: `params.nosuch`: "]
    assert [problem[:len(start)] for problem, start in zip(found, expected, strict=False)] == expected, found
    assert len(found) == len(expected), found
    assert not any("params.env`" in problem for problem in found)  # the parameter that failed is still one


def test_yaml_values_without_a_json_form_are_text_or_refused():
    """YAML makes `2024-01-01` a date and `.nan` a float NaN: a date default could not be written to the audit
    chain (every event of the workflow was set aside) and a NaN one was hashed as NaN but stored as null, which
    `audit verify` then called an edited record."""
    workflow = compile_workflow("name: x\non: webhook\nparams:\n  since: {default: 2024-01-01}\n"
                                "  at: {default: 2024-01-01T10:00:00Z}\nsteps: []\n", file="x.yml")
    assert workflow.model.params["since"].default == "2024-01-01"
    assert workflow.model.params["at"].default == "2024-01-01T10:00:00Z"
    for value in (".nan", "-.inf"):
        message = problems(f"""
            name: x
            on: webhook
            params:
              ratio: {{default: {value}}}
            steps: []
            """)
        assert any("line 4" in line and "not a number JSON can hold" in line for line in message), message


def test_a_key_given_twice_is_refused_with_both_lines():
    """The last of two `approval:` keys won, silently: a gated deploy became an automatic one."""
    message = problems("""
        name: x
        on: webhook
        steps:
          - id: deploy
            approval: required
            uses: http.request
            with: {url: "https://deploy.example.com", method: POST}
            approval: none
        """)
    assert any("line 8" in line and "`approval` is given twice (first at line 5)" in line for line in message), message
    merged = compile_workflow("name: x\non: webhook\nsteps:\n  - &base {id: a, uses: http.request, with: {url: "
                              "'https://a.example'}}\n  - <<: *base\n    id: b\n", file="x.yml")
    assert [step.id for step in merged.steps] == ["a", "b"]  # a merged-in key may still be overridden


def test_a_hash_inside_a_block_value_is_text_not_a_comment():
    """`Incident #${{ event.n }}` in a `|` block was refused as a comment cutting off a template, and the whole
    catalog with it; in a plain value it still is one."""
    workflow = compile_workflow(textwrap.dedent("""
        name: x
        on: webhook
        card:
          title: >
            Incident #${{ event.n }}
        steps:
          - id: s
            uses: slack.post
            with:
              text: |
                Incident #${{ event.n }} opened
                by ${{ event.who }} #${{ event.m }}
        """).lstrip(), file="x.yml")
    assert workflow.steps[0].id == "s"
    message = problems("""
        name: x
        on: webhook
        card:
          title: Incident #${{ event.n }}
        steps: []
        """)
    assert any(":4:" in line and "starts a YAML comment" in line for line in message), message


def test_the_workflow_if_is_refused_a_run_field_that_does_not_exist_yet():
    """`if: run.channel == "C1"` passed validate, then failed for every event at intake (only `run.workflow`
    exists before the run does): the workflow never started, with no more than an INFO line per event."""
    message = problems("""
        name: x
        on: webhook
        if: run.channel == "C0DEPLOYS" && event.ok
        steps: []
        """)
    assert any(":3:" in line and "not `run.channel`" in line for line in message), message
    assert compile_workflow("name: x\non: webhook\nif: run.workflow == 'x'\nsteps: []\n", file="x.yml").if_
