"""`python -m bot.docs_gen [--check]`: write the generated parts of docs/workflows.md from the code.

The trigger list comes from `bot.engine.triggers_config.TRIGGER_CONFIGS` and the action reference from
`integrations.registry.ACTIONS` (each action's typed `Input` and `Output` models), so the reference stays true
as integrations and actions are added. Only the text between the `BEGIN GENERATED` / `END GENERATED` markers
is rewritten; `--check` only reports whether it is out of date (exit status 1), for CI.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

DOC = Path(__file__).resolve().parent.parent / "docs" / "workflows.md"
_REGION = re.compile(r"(<!-- BEGIN GENERATED (\w+)[^>]*-->\n)(.*?)(<!-- END GENERATED \2 -->)", re.DOTALL)
_SCALARS = {str: "string", int: "integer", bool: "boolean", float: "number", datetime.timedelta:
            "duration (`30s`, `10m`, `1h30m`)", type(None): "null", typing.Any: "any"}


def type_text(annotation: Any) -> str:
    """A type as a workflow author reads it (no `|`, which would break a Markdown table)."""
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " or ".join(f"`{json.dumps(value)}`" for value in args)
    if origin in (typing.Union, types.UnionType):
        kept = [type_text(arg) for arg in args if arg is not type(None)]
        return " or ".join(kept) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {type_text(args[0]) if args else 'any'}"
    if origin is dict:
        return f"map of {type_text(args[1]) if len(args) > 1 else 'any'}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        keys = ", ".join(info.alias or name for name, info in annotation.model_fields.items())
        return f"object {{{keys}}}"
    return getattr(annotation, "__name__", str(annotation))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "**required**"
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "—"
    if isinstance(value, datetime.timedelta):
        return f"`{value.total_seconds():g}s`"
    return f"`{json.dumps(value, default=str)}`"


def action_section() -> str:
    from integrations.registry import ACTIONS

    lines = ["| action | what it does |", "|---|---|"]
    lines += [f"| [`{name}`](#{name.replace('.', '')}) | {_cell(ACTIONS[name].description)} |"
              for name in sorted(ACTIONS)]
    for name in sorted(ACTIONS):
        action = ACTIONS[name]
        lines += ["", f"### `{name}`", "", action.description]
        lines += ["", "| input (`with:`) | type | default | description |", "|---|---|---|---|"]
        for field_name, info in action.Input.model_fields.items():
            lines.append(f"| `{info.alias or field_name}` | {_cell(type_text(info.annotation))} | "
                         f"{_cell(_default(info))} | {_cell(info.description or '')} |")
        outputs = action.Output.model_fields
        lines += ["", "Outputs (`steps.<id>.outputs.…`):", ""]
        if outputs:
            lines += ["| output | type | description |", "|---|---|---|"]
            lines += [f"| `{info.alias or field_name}` | {_cell(type_text(info.annotation))} | "
                      f"{_cell(info.description or '')} |" for field_name, info in outputs.items()]
        else:
            lines.append("none.")
    return "\n".join(lines) + "\n"


def _first_paragraph(text: str | None) -> str:
    return " ".join((text or "").strip().split("\n\n")[0].split())


def trigger_section() -> str:
    from bot.engine.triggers_config import TRIGGER_CONFIGS
    from integrations.registry import INTEGRATIONS

    lines = ["| trigger | what | keys under `on.<trigger>:` |", "|---|---|---|"]
    for name in sorted(TRIGGER_CONFIGS):
        model = TRIGGER_CONFIGS[name]
        integration = INTEGRATIONS.get(name)
        if integration is not None:
            what = _first_paragraph(sys.modules[integration.__module__].__doc__) or integration.title
        else:
            what = _first_paragraph(model.__doc__)
        keys = "; ".join(f"`{info.alias or key}` ({type_text(info.annotation)})"
                         + (f": {info.description}" if info.description else "")
                         for key, info in model.model_fields.items()) or "none"
        lines.append(f"| `{name}` | {_cell(what)} | {_cell(keys)} |")
    return "\n".join(lines) + "\n"


SECTIONS = {"triggers": trigger_section, "actions": action_section}


def render(document: str) -> str:
    def replace(match: re.Match[str]) -> str:
        section = SECTIONS.get(match.group(2))
        if section is None:
            return match.group(0)
        return match.group(1) + section() + match.group(4)

    return _REGION.sub(replace, document)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bot.docs_gen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date; write nothing")
    parser.add_argument("--file", type=Path, default=DOC, help=f"the document (default: {DOC})")
    args = parser.parse_args(argv)
    current = args.file.read_text(encoding="utf-8")
    missing = [name for name in SECTIONS if f"<!-- BEGIN GENERATED {name}" not in current]
    if missing:
        print(f"{args.file}: no GENERATED markers for {', '.join(missing)}", file=sys.stderr)
        return 1
    updated = render(current)
    if args.check:
        if updated != current:
            print(f"{args.file} is out of date: run `python -m bot.docs_gen`", file=sys.stderr)
            return 1
        return 0
    if updated != current:
        args.file.write_text(updated, encoding="utf-8")
        print(f"updated {args.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
