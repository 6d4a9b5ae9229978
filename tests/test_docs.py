"""The generated parts of docs/workflows.md match the code (`python -m bot.docs_gen` rewrites them)."""

from __future__ import annotations

from bot import docs_gen
from integrations.registry import ACTIONS


def test_the_workflow_reference_is_up_to_date():
    current = docs_gen.DOC.read_text(encoding="utf-8")
    assert docs_gen.render(current) == current, "docs/workflows.md is out of date: run `python -m bot.docs_gen`"
    for name in ACTIONS:
        assert f"### `{name}`" in current


def test_the_generator_finds_a_stale_section(tmp_path):
    stale = tmp_path / "workflows.md"
    stale.write_text(docs_gen.DOC.read_text(encoding="utf-8").replace("### `http.request`", "### `http.gone`"))
    assert docs_gen.main(["--check", "--file", str(stale)]) == 1
    assert docs_gen.main(["--file", str(stale)]) == 0
    assert docs_gen.main(["--check", "--file", str(stale)]) == 0
    assert "### `http.request`" in stale.read_text(encoding="utf-8")
