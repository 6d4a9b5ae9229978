"""Workflow files → compiled workflows, or every problem with its file and line.

YAML is read node by node so each key keeps its line, and so a bare `on` key stays the string "on" (YAML 1.1
would read it as `true`). Everything that can be checked before a run is checked here: the format, the
trigger configurations, every CEL expression, the actions and their inputs, and every `steps.<id>` and
`params.<name>` an expression names.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from bot.engine.expressions import (
    STDLIB_NAMESPACES,
    CompiledValue,
    Expression,
    Template,
    compile_expression,
    compile_template,
    compile_value,
    has_template,
    step_references,
)
from bot.engine.triggers_config import TRIGGER_CONFIGS
from bot.engine.workflow import PATTERN_HELP, Approvers, Step, Workflow
from bot.errors import ExpressionError, WorkflowError, WorkflowProblem
from integrations.registry import ACTIONS

Path_ = tuple[str | int, ...]
MAX_NODES = 20_000


class _LineMap(dict[Path_, int]):
    def line(self, path: Iterable[str | int]) -> int | None:
        path = tuple(path)
        while True:
            if path in self:
                return self[path]
            if not path:
                return None
            path = path[:-1]


def _read_yaml(text: str) -> tuple[Any, _LineMap]:
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    lines = _LineMap()
    if node is None:
        return None, lines
    constructor = yaml.constructor.SafeConstructor()
    count = 0

    def walk(current: yaml.Node, path: Path_) -> Any:
        nonlocal count
        count += 1
        if count > MAX_NODES:
            raise yaml.YAMLError(f"more than {MAX_NODES} values: is an alias expanding without end?")
        lines.setdefault(path, current.start_mark.line + 1)
        if isinstance(current, yaml.MappingNode):
            # A key given twice is an error, not "the last one wins": a repeated `approval:` or `if:` would
            # silently replace the first (keys merged in with `<<:` may still be overridden, as YAML means).
            first_line: dict[str, int] = {}
            for key_node, _ in current.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    line = key_node.start_mark.line + 1
                    if str(key_node.value) in first_line:
                        raise yaml.YAMLError(f"line {line}: `{key_node.value}` is given twice (first at line "
                                             f"{first_line[str(key_node.value)]})")
                    first_line[str(key_node.value)] = line
            constructor.flatten_mapping(current)
            result: dict[str, Any] = {}
            for key_node, value_node in current.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise yaml.YAMLError(f"line {key_node.start_mark.line + 1}: keys must be plain text")
                key = str(key_node.value)
                lines[(*path, key)] = key_node.start_mark.line + 1
                result[key] = walk(value_node, (*path, key))
            return result
        if isinstance(current, yaml.SequenceNode):
            return [walk(item, (*path, index)) for index, item in enumerate(current.value)]
        value = constructor.construct_object(current, deep=True)
        return _json_scalar(value, current)

    return walk(node, ()), lines


def _json_scalar(value: Any, node: yaml.Node) -> Any:
    """A YAML scalar as the JSON value everything downstream expects (events, parameters, the audit chain):
    a date stays the text it was written as (YAML would make it a date object, which JSON has no form for);
    `.nan`, `.inf` and binary have no JSON form at all."""
    if isinstance(value, date):  # datetime too
        return str(node.value)
    if isinstance(value, float) and not math.isfinite(value):
        raise yaml.YAMLError(f"line {node.start_mark.line + 1}: {node.value} is not a number JSON can hold; "
                             "quote it if it is meant as text")
    if isinstance(value, bytes):
        raise yaml.YAMLError(f"line {node.start_mark.line + 1}: binary values are not supported; use text")
    return value


@dataclass
class CompiledStep:
    model: Step
    index: int
    if_: Expression | None
    title: Template | None
    inputs: CompiledValue
    approvers: Approvers | None

    @property
    def id(self) -> str:
        return self.model.id

    @property
    def needs_approval(self) -> bool:
        return self.model.approval is not None


@dataclass
class CompiledWorkflow:
    model: Workflow
    path: str
    source: str
    hash: str
    if_: Expression | None
    concurrency_key: Expression | None
    card_title: Template | None
    card_text: Template | None
    card_fields: dict[str, CompiledValue]
    card_link: Template | None
    triggers: dict[str, BaseModel]
    steps: list[CompiledStep] = field(default_factory=list)

    @functools.cached_property
    def card_follows_progress(self) -> bool:
        """Whether the card's text can change while the run goes on (it names `steps` or `run`)."""
        templates = [t for t in (self.card_title, self.card_text, self.card_link) if t is not None]
        for value in self.card_fields.values():
            templates.extend(value.templates())
        names: set[str] = set()
        for template in templates:
            for expression in template.expressions():
                names |= expression.references()
        return bool(names & {"steps", "run"})

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def title(self) -> str:
        return self.model.display_title

    def step(self, step_id: str) -> CompiledStep:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)


class _Checker:
    def __init__(self, file: str, lines: _LineMap) -> None:
        self.file = file
        self.lines = lines
        self.problems: list[WorkflowProblem] = []
        self.step_ids: set[str] = set()

    def sorted(self) -> list[WorkflowProblem]:
        return sorted(self.problems, key=lambda problem: problem.line or 0)

    def problem(self, path: Iterable[str | int], message: str) -> None:
        self.problems.append(WorkflowProblem(file=self.file, line=self.lines.line(path), message=message))

    def expression(self, path: Path_, source: Any, *, allowed: set[str], steps_before: set[str],
                   params: set[str]) -> Expression | None:
        if not isinstance(source, str):
            self.problem(path, "must be a CEL expression (text)")
            return None
        try:
            compiled = compile_expression(source)
        except ExpressionError as exc:
            self.problem(path, f"bad expression: {exc}")
            return None
        self._references(path, compiled, allowed=allowed, steps_before=steps_before, params=params)
        return compiled

    def template(self, path: Path_, text: Any, *, allowed: set[str], steps_before: set[str],
                 params: set[str]) -> Template | None:
        if text is None:
            return None
        if not isinstance(text, str):
            text = str(text)
        try:
            compiled = compile_template(text)
        except ExpressionError as exc:
            self.problem(path, f"bad expression: {exc}")
            return None
        for expression in compiled.expressions():
            self._references(path, expression, allowed=allowed, steps_before=steps_before, params=params)
        return compiled

    def value(self, path: Path_, value: Any, *, allowed: set[str], steps_before: set[str],
              params: set[str]) -> CompiledValue | None:
        try:
            compiled = compile_value(value)
        except ExpressionError as exc:
            self.problem(path, f"bad expression: {exc}")
            return None
        for template in compiled.templates():
            for expression in template.expressions():
                self._references(path, expression, allowed=allowed, steps_before=steps_before, params=params)
        return compiled

    def _references(self, path: Path_, expression: Expression, *, allowed: set[str], steps_before: set[str],
                    params: set[str]) -> None:
        for name in sorted(expression.references() - allowed - STDLIB_NAMESPACES
                           - {"event", "trigger", "run", "params", "steps", "secrets"}):
            self.problem(path, f"`{expression.source}`: unknown name {name}")
        for name in sorted(expression.references() & {"steps", "secrets"} - allowed):
            where = "steps' inputs (`with:`)" if name == "secrets" else "steps and the card"
            self.problem(path, f"`{expression.source}`: `{name}` is only available in {where}")
        if "steps" in expression.references():
            for step_id in sorted(step_references(expression.source) - steps_before):
                later = step_id in self.step_ids
                self.problem(path, f"`{expression.source}`: "
                             + (f"step {step_id!r} has not run yet here (only earlier steps can be named)"
                                if later else f"unknown step id {step_id!r}"))
        self.parameters(path, expression, params)

    def parameters(self, path: Path_, expression: Expression, params: set[str]) -> None:
        """Every `params.<name>` the expression names must be declared under `params:`."""
        if "params" in expression.references():
            stripped = re.sub(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'", '""', expression.source)
            for name in sorted(set(re.findall(r"\bparams\s*\.\s*([A-Za-z_]\w*)", stripped)) - params):
                self.problem(path, f"`{expression.source}`: unknown parameter {name!r} (declare it under params:)")


def _check_inputs(checker: _Checker, path: Path_, action_name: str, raw: dict[str, Any]) -> None:
    model = ACTIONS[action_name].Input
    by_key = {(info.alias or name): info for name, info in model.model_fields.items()}
    for key in raw:
        if key not in by_key:
            expected = ", ".join(sorted(by_key))
            checker.problem((*path, key), f"{action_name} has no input {key!r} (its inputs: {expected})")
    for key, info in by_key.items():
        if info.is_required() and key not in raw:
            checker.problem(path, f"{action_name} needs the input {key!r}")
    static = {key: value for key, value in raw.items() if key in by_key and not has_template(value)}
    for key, value in static.items():
        try:
            field_type: Any = Annotated[by_key[key].annotation, by_key[key]]
            TypeAdapter(field_type).validate_python(value)
        except ValidationError as exc:
            checker.problem((*path, key),
                            f"{action_name} input {key!r}: {_first_error(exc, help=by_key[key].description)}")
    if len(static) == len(raw) and not checker.problems:
        try:
            model.model_validate(raw)
        except ValidationError as exc:
            checker.problem(path, f"{action_name}: {_first_error(exc)}")


def _message(error: Any, *, help: str | None = None) -> str:
    """pydantic's message, in words where it would show a regular expression."""
    if error["type"] == "string_pattern_mismatch":
        help = help or PATTERN_HELP.get(str(error.get("ctx", {}).get("pattern")))
        if help:
            return f"{error['input']!r} does not have the expected form: {help}"
    return str(error["msg"]).removeprefix("Value error, ")


def _first_error(exc: ValidationError, *, help: str | None = None) -> str:
    error = exc.errors()[0]
    message = _message(error, help=help)
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {message}" if where else message


def _validate(checker: _Checker, model: type[BaseModel], data: Any, prefix: Path_) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            loc = (*prefix, *error["loc"])
            message = _message(error)
            if error["type"] == "extra_forbidden":
                checker.problem(loc, f"unknown key {loc[-1]!r}")
                continue
            if error["type"] == "missing":
                message = f"{loc[-1]!r} is required"
                loc = loc[:-1]
            label = ".".join(str(part) for part in loc)
            checker.problem(loc, f"{label}: {message}" if label else message)
        return None


def _without_what_failed(data: dict[str, Any]) -> tuple[Workflow | None, set[str]]:
    """The workflow's top level validated without the entries that failed (a parameter, or a whole key such as
    `approvers`), and what was left out (`params.<name>` or the key); None when even that fails (a bad name)."""
    data = dict(data)
    dropped: set[str] = set()
    for _attempt in range(5):
        try:
            return Workflow.model_validate(data), dropped
        except ValidationError as exc:
            locations = [error["loc"] for error in exc.errors()]
        for loc in locations:
            key = str(loc[0]) if loc else ""
            if key in ("", "name"):
                return None, dropped
            params = data.get("params")
            if key == "params" and len(loc) > 1 and isinstance(params, dict) and loc[1] in params:
                data["params"] = {name: spec for name, spec in params.items() if name != loc[1]}
                dropped.add(f"params.{loc[1]}")
            else:
                data.pop(key, None)
                dropped.add(key)
    return None, dropped


def _trigger_expressions(config: BaseModel) -> list[Expression]:
    """The CEL a trigger's configuration carries (a poll's `items`, `key` and request templates)."""
    found: list[Expression] = []
    for attribute in ("items_expression", "key_expression"):
        expression = getattr(config, attribute, None)
        if isinstance(expression, Expression):
            found.append(expression)
    request = getattr(config, "compiled_request", None)
    if isinstance(request, CompiledValue):
        for template in request.templates():
            found.extend(template.expressions())
    return found


def _block_scalar_lines(text: str) -> set[int]:
    """The lines inside `|` and `>` block values, where `#` is text, not a comment."""
    inside: set[int] = set()
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    pending: list[yaml.Node] = [root] if root is not None else []
    while pending:
        node = pending.pop()
        if isinstance(node, yaml.ScalarNode) and node.style in ("|", ">"):
            inside.update(range(node.start_mark.line + 2, node.end_mark.line + 2))
        elif isinstance(node, yaml.MappingNode):
            pending.extend(item for pair in node.value for item in pair)
        elif isinstance(node, yaml.SequenceNode):
            pending.extend(node.value)
    return inside


def _comments_cutting_templates(text: str) -> list[int]:
    """Lines where an unquoted ` #` (a YAML comment) swallows a `${{ }}`: `title: Incident #${{ event.n }}`."""
    found = []
    in_blocks: set[int] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        index = line.find(" #")
        if index < 0 or line.lstrip().startswith("#") or "${{" not in line[index:]:
            continue
        if in_blocks is None:
            in_blocks = _block_scalar_lines(text)
        if number in in_blocks:
            continue  # a line of a `|` or `>` value: ` #` is part of the text
        before = line[:index]
        if before.count('"') % 2 or before.count("'") % 2:
            continue  # the ` #` is inside a quoted value
        found.append(number)
    return found


def compile_workflow(text: str, *, file: str, default_name: str | None = None) -> CompiledWorkflow:
    """Parse, validate and compile one workflow; raise WorkflowError listing every problem found."""
    try:
        data, lines = _read_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise WorkflowError([WorkflowProblem(file=file, line=line, message=f"not valid YAML: {problem}")]) from None
    checker = _Checker(file, lines)
    if not isinstance(data, dict):
        raise WorkflowError([WorkflowProblem(file=file, line=1, message="a workflow is a YAML mapping")])
    for number in _comments_cutting_templates(text):
        checker.problems.append(WorkflowProblem(
            file=file, line=number, message="` #` starts a YAML comment here, which cuts off the `${{ }}` after "
                                            "it: put the whole value in quotes"))
    if "name" not in data and default_name:
        data["name"] = default_name
    raw_steps = data.get("steps", [])
    if not isinstance(raw_steps, list):
        checker.problem(("steps",), "steps: must be a list of steps")
        raw_steps = []
    model = _validate(checker, Workflow, {key: value for key, value in data.items() if key != "steps"}, ())
    valid_steps: list[Step] = []
    raw_index: list[int] = []  # each valid step's position in the file, for line numbers
    left_out: dict[int, dict[str, Any]] = {}  # steps that failed their schema, by position
    for index, raw_step in enumerate(raw_steps):
        step_model = _validate(checker, Step, raw_step, ("steps", index))
        if step_model is None:
            if isinstance(raw_step, dict):
                left_out[index] = raw_step
            continue
        if any(step.id == step_model.id for step in valid_steps):
            # Reported at the repeated `id:` and left out, so that the rest of the file is still checked.
            checker.problem(("steps", index, "id"), f"step id {step_model.id!r} is used twice")
            continue
        valid_steps.append(step_model)
        raw_index.append(index)
    dropped: set[str] = set()
    if model is None:
        # Its problems are reported; the rest of the file is still checked without the parts that failed, so
        # that one run of `relaybot validate` shows every problem.
        model, dropped = _without_what_failed({key: value for key, value in data.items() if key != "steps"})
        if model is None:
            raise WorkflowError(checker.sorted())
    try:
        model = Workflow.model_validate({**model.model_dump(by_alias=True, exclude={"steps"}),
                                         "steps": [step.model_dump(by_alias=True) for step in valid_steps]})
    except ValidationError as exc:
        checker.problem(("steps",), str(exc.errors()[0]["msg"]).removeprefix("Value error, "))

    # A parameter left out for failing its schema is still a parameter to the expressions that name it.
    params = set(model.params) | {name.removeprefix("params.") for name in dropped if name.startswith("params.")}
    # Steps left out for failing their schema are still named as steps (not as unknown ids) by the others.
    checker.step_ids = {step.id for step in model.steps} | ({_raw_id(raw) for raw in left_out.values()} - {""})
    base = {"event", "trigger", "params", "run"}

    triggers: dict[str, BaseModel] = {}
    if not model.on and "on" not in dropped:
        checker.problem(("on",) if "on" in data else (), "a workflow needs at least one trigger under `on:` "
                        f"({', '.join(sorted(TRIGGER_CONFIGS))})")
    for trigger, config in model.on.items():
        config_model = TRIGGER_CONFIGS.get(trigger)
        if config_model is None:
            checker.problem(("on", trigger), f"unknown trigger {trigger!r} (known: "
                            f"{', '.join(sorted(TRIGGER_CONFIGS))})")
            continue
        try:
            triggers[trigger] = config_model.model_validate(config)
        except ValidationError as exc:
            for error in exc.errors():
                loc = ("on", trigger, *error["loc"])
                message = (f"unknown key {error['loc'][-1]!r}" if error["type"] == "extra_forbidden"
                           else str(error["msg"]).removeprefix("Value error, "))
                checker.problem(loc, f"on.{trigger}: {message}")

    for trigger, config in triggers.items():
        for expression in _trigger_expressions(config):
            checker.parameters(("on", trigger), expression, params)
    if_ = (checker.expression(("if",), model.if_, allowed=base, steps_before=set(), params=params)
           if model.if_ else None)
    # Before a run exists only its workflow is known: `run.channel` here would fail for every event, and the
    # workflow would never start (each event logged as "does not match").
    for field_path in (if_.reads or {}).get("run", ()) if if_ is not None else ():
        if field_path and field_path[0] != "workflow":
            checker.problem(("if",), f"the workflow's `if:` decides whether a run starts, so of `run` it sees only "
                                     f"`run.workflow`, not `run.{field_path[0]}` (a step's `if:` sees the rest)")
    concurrency_key = None
    if model.concurrency is not None and model.concurrency.key:
        concurrency_key = checker.expression(("concurrency", "key"), model.concurrency.key,
                                             allowed={"event", "trigger", "params"}, steps_before=set(),
                                             params=params)
    all_steps = set(checker.step_ids)
    card_scope = {**{name: None for name in base}, "steps": None}
    card_title = checker.template(("card", "title"), model.card.title, allowed=set(card_scope),
                                  steps_before=all_steps, params=params)
    card_text = checker.template(("card", "text"), model.card.text, allowed=set(card_scope),
                                 steps_before=all_steps, params=params)
    card_link = checker.template(("card", "link"), model.card.link, allowed=set(card_scope),
                                 steps_before=all_steps, params=params)
    card_fields: dict[str, CompiledValue] = {}
    for label, value in model.card.fields.items():
        compiled_field = checker.value(("card", "fields", label), value, allowed=set(card_scope),
                                       steps_before=all_steps, params=params)
        if compiled_field is not None:
            card_fields[label] = compiled_field

    steps: list[CompiledStep] = []
    earlier: set[str] = set()
    scope = base | {"steps"}
    valid_at = {raw_index[index]: index for index in range(len(model.steps))}
    for position in sorted([*valid_at, *left_out]):
        path: Path_ = ("steps", position)
        if position in left_out:
            _check_left_out(checker, path, left_out[position], scope=scope, earlier=earlier, params=params)
            earlier |= {_raw_id(left_out[position])} - {""}
            continue
        index = valid_at[position]
        step = model.steps[index]
        step_if = (checker.expression((*path, "if"), step.if_, allowed=scope, steps_before=earlier, params=params)
                   if step.if_ else None)
        title = checker.template((*path, "title"), step.title, allowed=scope, steps_before=earlier, params=params)
        # Inputs are rendered after the step's own approval, so they may name it (`steps.<self>.approved_by`).
        inputs = checker.value((*path, "with"), step.with_, allowed=scope | {"secrets"},
                               steps_before=earlier | {step.id}, params=params)
        if step.uses not in ACTIONS:
            checker.problem((*path, "uses"), f"unknown action {step.uses!r} (known: {', '.join(sorted(ACTIONS))})")
        else:
            _check_inputs(checker, (*path, "with"), step.uses, step.with_)
        approval = step.approval
        approvers = (approval.approvers if approval and approval.approvers else step.approvers) or model.approvers
        if inputs is not None:
            steps.append(CompiledStep(model=step, index=index, if_=step_if, title=title, inputs=inputs,
                                      approvers=approvers))
        earlier.add(step.id)

    if checker.problems:
        raise WorkflowError(checker.sorted())
    return CompiledWorkflow(model=model, path=file, source=text, hash=content_hash(text), if_=if_,
                            concurrency_key=concurrency_key,
                            card_title=card_title, card_text=card_text, card_fields=card_fields,
                            card_link=card_link, triggers=triggers, steps=steps)


def _raw_id(raw: dict[str, Any]) -> str:
    return raw["id"] if isinstance(raw.get("id"), str) else ""


def _check_left_out(checker: _Checker, path: Path_, raw: dict[str, Any], *, scope: set[str], earlier: set[str],
                    params: set[str]) -> None:
    """A step that failed its schema is left out, but its expressions are checked all the same, so that one
    `relaybot validate` shows every problem rather than the next one after each fix."""
    if isinstance(raw.get("if"), str):
        checker.expression((*path, "if"), raw["if"], allowed=scope, steps_before=earlier, params=params)
    if isinstance(raw.get("title"), str):
        checker.template((*path, "title"), raw["title"], allowed=scope, steps_before=earlier, params=params)
    if isinstance(raw.get("with"), dict):
        checker.value((*path, "with"), raw["with"], allowed=scope | {"secrets"},
                      steps_before=earlier | {_raw_id(raw)}, params=params)


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def workflow_files(paths: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix in (".yml", ".yaml") and p.is_file()))
        else:
            files.append(path)
    return files


def load_file(path: Path) -> CompiledWorkflow:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkflowError([WorkflowProblem(file=str(path), line=None, message=f"cannot read: {exc}")]) from None
    return compile_workflow(text, file=str(path), default_name=path.stem)


class Catalog:
    """The workflows of the workflows directory, by name; shared by every workspace."""

    def __init__(self, workflows: Iterable[CompiledWorkflow] = ()) -> None:
        self.by_name: dict[str, CompiledWorkflow] = {}
        self._by_hash: dict[str, CompiledWorkflow] = {}
        for workflow in workflows:
            self.by_name[workflow.name] = workflow
            self._by_hash[workflow.hash] = workflow

    @classmethod
    def load(cls, paths: Iterable[Path]) -> Catalog:
        """Every workflow under `paths`; raise WorkflowError with every problem of every file."""
        problems: list[WorkflowProblem] = []
        workflows: list[CompiledWorkflow] = []
        names: dict[str, str] = {}
        for path in workflow_files(paths):
            try:
                workflow = load_file(path)
            except WorkflowError as exc:
                problems.extend(exc.problems)
                continue
            if workflow.name in names:
                problems.append(WorkflowProblem(file=str(path), line=None, message=f"the name {workflow.name!r} "
                                                f"is already used by {names[workflow.name]}"))
                continue
            names[workflow.name] = str(path)
            workflows.append(workflow)
        if problems:
            raise WorkflowError(problems)
        return cls(workflows)

    def get(self, name: str) -> CompiledWorkflow | None:
        return self.by_name.get(name)

    def version(self, content_hash_: str, *, source: str | None = None, path: str = "",
                name: str | None = None) -> CompiledWorkflow:
        """The workflow as it was when a run started (from the catalog, or compiled from its stored text, whose
        `name:` may have come from its file's name: `name` is the one it was stored under)."""
        found = self._by_hash.get(content_hash_)
        if found is not None:
            return found
        if source is None:
            raise KeyError(content_hash_)
        compiled = compile_workflow(source, file=path or content_hash_[:12],
                                    default_name=name or (Path(path).stem if path else None))
        self._by_hash[content_hash_] = compiled
        return compiled

    def __iter__(self) -> Any:
        return iter(sorted(self.by_name.values(), key=lambda workflow: workflow.name))

    def __len__(self) -> int:
        return len(self.by_name)
