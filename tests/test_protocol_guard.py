"""The protocol as released: protocol/schemas and protocol/vectors against the copy of the
last release in protocol/released/VERSION/, under SPEC.md section 7's rules. Additive
changes pass (new optional request fields, new reply members, new reply values); a
removed or renamed field, a new required one, a changed type, default or limit, a reply
value that is gone (as `ready` became `serving`) or a conformance vector that now expects
otherwise fails, unless constants.VERSION was bumped (then record the new release)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmsup.protocol import constants as C

ROOT = Path(__file__).resolve().parent.parent / "protocol"
RELEASED = ROOT / "released" / C.VERSION.decode()
# What pins a request field's meaning: changing any of these bumps the version.
PINNED = (
    "type",
    "default",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "maxProperties",
    "const",
    "pattern",
)

pytestmark = pytest.mark.skipif(
    not RELEASED.is_dir(), reason=f"{C.VERSION.decode()} has no recorded release: a bump"
)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def names(kind: str) -> list[str]:
    return sorted(p.name for p in (RELEASED / "schemas").glob(f"{kind}.*.json"))


def walk(old: dict, new: dict, at: str, request: bool, problems: list[str]) -> None:
    """Compare one released subschema with the current one at JSON pointer `at`."""
    if request:
        for word in PINNED:
            if old.get(word) != new.get(word):
                problems.append(f"{at}: {word} {old.get(word)!r} became {new.get(word)!r}")
        added = set(new.get("required", ())) - set(old.get("required", ()))
        if added:
            problems.append(f"{at}: newly required {sorted(added)}")
        if "enum" in old and set(new.get("enum", ())) != set(old["enum"]):
            problems.append(f"{at}: enum {old['enum']} became {new.get('enum')}")
    elif "enum" in old:  # a reply value clients know must still be sent as it was
        gone = set(map(json.dumps, old["enum"])) - set(map(json.dumps, new.get("enum", ())))
        if gone:
            problems.append(f"{at}: reply values {sorted(gone)} are gone")
    for key in ("properties", "$defs"):
        for name, sub in (old.get(key) or {}).items():
            if name not in (new.get(key) or {}):
                problems.append(f"{at}/{key}/{name}: removed")
            elif isinstance(sub, dict):
                walk(sub, new[key][name], f"{at}/{key}/{name}", request, problems)
    for key in ("items", "additionalProperties"):
        if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            walk(old[key], new[key], f"{at}/{key}", request, problems)
    for key in ("anyOf", "oneOf"):
        for i, (a, b) in enumerate(zip(old.get(key, ()), new.get(key, ()), strict=False)):
            walk(a, b, f"{at}/{key}/{i}", request, problems)


@pytest.mark.parametrize("name", names("request") + names("reply"))
def test_schemas_change_only_as_section_7_allows(name):
    current = ROOT / "schemas" / name
    assert current.exists(), f"{name} was released in {C.VERSION.decode()} and is gone"
    problems: list[str] = []
    walk(load(RELEASED / "schemas" / name), load(current), "", name.startswith("request"), problems)
    assert not problems, f"{name}: changes that bump the version (SPEC.md 7): {problems}"


def test_released_vectors_still_hold():
    released = {v["name"]: v for v in load(RELEASED / "vectors" / "requests.json")["vectors"]}
    current = {v["name"]: v for v in load(ROOT / "vectors" / "requests.json")["vectors"]}
    changed = [n for n, v in released.items() if current.get(n) != v]
    assert not changed, f"released vectors removed or changed (SPEC.md 7): {changed}"


def test_the_guard_sees_a_renamed_reply_value(tmp_path):
    """The change issue 27 found, replayed: a worker state value renamed in status."""
    old = load(RELEASED / "schemas" / "reply.done.status.json")
    new = json.loads(json.dumps(old).replace('"serving"', '"ready"'))
    problems: list[str] = []
    walk(old, new, "", False, problems)
    assert any("serving" in p and "gone" in p for p in problems)
    # And a request limit lowered, such as max_tokens' maximum:
    old = load(RELEASED / "schemas" / "request.complete.json")
    new = json.loads(json.dumps(old))
    new["properties"]["max_tokens"]["maximum"] = 16384
    problems = []
    walk(old, new, "", True, problems)
    assert problems == ["/properties/max_tokens: maximum 32768 became 16384"]
