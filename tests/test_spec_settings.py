"""SPEC.md 6.7's table of per-server flags against the one settings declaration
(supervisor/settings.py), so the two cannot drift apart (issue 27: the table said
gemma3-270m was the default model while the server's default was SmolLM2)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llmsup.supervisor import settings
from llmsup.supervisor.models.catalog import DEFAULT_MODEL

SPEC = Path(__file__).resolve().parent.parent / "protocol" / "SPEC.md"
BY_NAME = {s.name: s for s in settings.for_process(settings.Process.START)}


def table_rows() -> list[tuple[list[str], str]]:
    """(flags, default cell) of each row of 6.7's flag table."""
    text = SPEC.read_text()
    section = text.split("### 6.7 Which limits are fixed", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        flags = re.findall(r"`(--[a-z-]+)`", cells[0]) if len(cells) >= 4 else []
        if flags:
            rows.append((flags, cells[1]))
    return rows


ROWS = table_rows()


def test_the_table_is_there():
    assert len(ROWS) >= 10


@pytest.mark.parametrize(("flags", "cell"), ROWS, ids=[" ".join(f) for f, _ in ROWS])
def test_each_flag_of_the_table_is_declared_with_its_default_and_range(flags, cell):
    for flag in flags:
        assert flag[2:] in BY_NAME, f"SPEC.md 6.7 names {flag}, which `llmsup start` lacks"
    setting = BY_NAME[flags[0][2:]]
    if setting.name == "model":
        assert cell == f"`{DEFAULT_MODEL}`", f"SPEC.md 6.7 gives {cell} as --model's default"
        return
    number = re.match(r"(\d+(?:\.\d+)?)( s| tokens| MiB)?\b", cell)
    if number and len(flags) == 1 and isinstance(setting.default, (int, float)):
        assert float(number.group(1)) == float(setting.default), (flags, cell, setting.default)
    bounds = re.search(r"\((\d+) to (\d+)\)", cell)
    if bounds:
        assert (float(bounds.group(1)), float(bounds.group(2))) == (setting.min, setting.max)
