#!/usr/bin/env python3
"""One benchmark of perf/run.py on two commits, alternated over rounds, as a table of each
row's mean ratio (and range) on either side: whether a change moved a figure beyond noise.

    python perf/ab.py 51c4f9a --only routing --rounds 3        # that commit against HEAD
    python perf/ab.py 51c4f9a --only throughput --rounds 3 --new-first

Each side runs from its own checkout (the old one in a temporary git worktree) with the
same virtualenv; `llmsup.*` resolves to the checkout through PYTHONPATH (its src/llmsup
links, or links made for a commit from before they existed). Rounds alternate the sides;
--new-first swaps which runs first in each pair (the second of a pair has run slower here).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("supervisor", "worker", "protocol")


def checkout(rev: str, into: Path) -> Path:
    """A worktree of `rev` in `into`, and the directory to put on PYTHONPATH for it."""
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(into), rev], check=True
    )
    src = into / "src"
    if not (src / "llmsup").exists():  # before src/llmsup: make the links here
        (src / "llmsup").mkdir(parents=True)
        (src / "llmsup" / "__init__.py").touch()
        for layer in LAYERS:
            (src / "llmsup" / layer).symlink_to(into / layer)
    return src


def run(tree: Path, src: Path, only: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    subprocess.run(
        [sys.executable, "perf/run.py", "--only", only],
        cwd=tree,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return json.loads((tree / "perf" / "results" / "latest.json").read_text())["rows"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", help="the commit to compare HEAD's working tree against")
    p.add_argument("--only", required=True, help="the perf/run.py benchmark")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-first", action="store_true")
    args = p.parse_args()
    ratios: dict[str, dict[str, list[float]]] = collections.defaultdict(
        lambda: collections.defaultdict(list)
    )
    with tempfile.TemporaryDirectory(prefix="llmsup-ab") as tmp:
        base_tree = Path(tmp) / "base"
        sides = {"base": (base_tree, checkout(args.base, base_tree)), "new": (ROOT, ROOT / "src")}
        order = ["new", "base"] if args.new_first else ["base", "new"]
        try:
            for i in range(args.rounds):
                for side in order:
                    print(f"ab: round {i + 1}, {side}", file=sys.stderr)
                    for row in run(*sides[side], args.only):
                        value = row["ratio"] if row["ratio"] is not None else row["llmsup"]
                        ratios[row["name"]][side].append(value)
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)],
                check=False,
            )
    print(f"| {args.only}: row | {args.base} | HEAD | HEAD / {args.base} |")
    print("|---|---|---|---|")
    for name, by_side in ratios.items():
        b, n = by_side["base"], by_side["new"]
        mb, mn = statistics.mean(b), statistics.mean(n)
        print(
            f"| {name} | {mb:.3g} ({min(b):.3g}-{max(b):.3g}) | {mn:.3g} "
            f"({min(n):.3g}-{max(n):.3g}) | {mn / mb:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
