"""`relaybot validate [PATH…]`: every problem of every workflow file, with file and line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bot.errors import WorkflowError
from bot.settings import Settings


def register(sub: Any) -> None:
    parser = sub.add_parser("validate", help="check workflow files; every problem with file and line")
    parser.add_argument("paths", nargs="*", help="files or directories (default: the workflows directory)")
    parser.set_defaults(handler=run)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'s' if count != 1 else ''}"


def run(args: argparse.Namespace, settings: Settings) -> int:
    from bot.engine.loader import load_file, workflow_files

    paths = [Path(path) for path in args.paths] or [settings.workflows_dir]
    missing = [path for path in paths if not path.exists()]
    if missing:
        for path in missing:
            print(f"{path}: no such file or directory", file=sys.stderr)
        return 1
    files = workflow_files(paths)
    if not files:
        # Most likely the wrong directory: a CI step checking nothing must not pass.
        print(f"no workflow files (*.yml, *.yaml) in {', '.join(map(str, paths))}", file=sys.stderr)
        return 1
    problems = 0
    names: dict[str, Path] = {}
    for file in files:
        try:
            workflow = load_file(file)
        except WorkflowError as exc:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            problems += len(exc.problems)
            continue
        if workflow.name in names:
            print(f"{file}: the name {workflow.name!r} is already used by {names[workflow.name]}", file=sys.stderr)
            problems += 1
        names[workflow.name] = file
    if problems:
        print(f"{_plural(problems, 'problem')} in {_plural(len(files), 'file')}", file=sys.stderr)
        return 1
    print(f"{_plural(len(files), 'workflow')} OK")
    return 0
