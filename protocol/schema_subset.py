"""The part of JSON Schema that llmsup turns into a grammar exactly (SPEC.md 3.11).

`normalize(schema, field)` checks a `json_schema` (or a tool's `parameters`) against that
subset and returns it in the form the worker converts (worker/grammar.py): every `$ref`
resolved to an entry of one top-level `$defs` whose names cannot collide with a rule of
the grammar, one-element `allOf` unwrapped. A keyword the converter would drop or loosen
(`minimum`, `uniqueItems`, `not`, a `format` it has no rule for, ...) is refused with
`bad_request` naming the keyword and its JSON pointer, never converted into a grammar
that lets through output the schema forbids. Size is bounded before any of this (the
body's frame, MAX_SCHEMA_BYTES); depth and repetition counts here, so neither the
supervisor's check nor the worker's conversion can be made to take long.

Pure Python, no llama.cpp: the supervisor refuses a schema at admission, before a worker
slot is spent on it.
"""

from __future__ import annotations

import re
from typing import Any

from llmsup.protocol import constants as C

# Keywords that only describe: JSON Schema validation ignores them, so may the grammar.
ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "$schema",
        "$id",
        "$comment",
        "$anchor",
        "default",
        "examples",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$defs",
        "definitions",
        "discriminator",  # OpenAPI's hint beside a oneOf; the oneOf itself is checked
        "strict",
    }
)
# Validation keywords the converter cannot honour exactly.
UNSUPPORTED = frozenset(
    {
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "minProperties",
        "maxProperties",
        "patternProperties",
        "propertyNames",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "unevaluatedProperties",
        "unevaluatedItems",
        "additionalItems",
        "contains",
        "minContains",
        "maxContains",
        "not",
        "if",
        "then",
        "else",
        "$dynamicRef",
        "$recursiveRef",
        "contentSchema",
    }
)
TYPES = ("string", "number", "integer", "boolean", "null", "object", "array")
FORMATS = ("date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5")
REF_PREFIX = "x-llmsup-ref-"  # $defs names of resolved references: no property is named so
# A pattern the converter turns into the same language: anchored, and only literals,
# classes that are not negated, groups, alternation and quantifiers. No ".", no escapes
# and no quote: the converter would put them into the JSON string unescaped or misread.
PATTERN_OK = re.compile(r'\^[^.\\"\x00-\x1f]*\$')
QUANTIFIER = re.compile(r"\{(\d+)(?:,(\d*))?\}")


class SchemaError(ValueError):
    """A schema outside the subset: `pointer` is where (a JSON pointer), `keyword` what."""

    def __init__(self, pointer: str, keyword: str | None, message: str):
        super().__init__(message)
        self.pointer = pointer
        self.keyword = keyword


def normalize(schema: Any, prefix: str = "") -> dict[str, Any]:
    """The schema in the form worker/grammar.py converts, or SchemaError. `prefix` makes
    the names of resolved references unique when several schemas are combined (tools)."""
    return _Normalizer(schema, prefix).run()


class _Normalizer:
    def __init__(self, root: Any, prefix: str):
        self.root = root
        self.prefix = prefix
        self.defs: dict[str, Any] = {}
        self.ref_names: dict[str, str] = {}
        self.nodes = 0

    def run(self) -> dict[str, Any]:
        if not isinstance(self.root, dict):
            raise SchemaError("", None, "a schema must be a JSON object")
        body = self.visit(self.root, "", 0)
        if self.defs:
            body = {**body, "$defs": {**body.get("$defs", {}), **self.defs}}
        return body

    def visit(self, node: Any, at: str, depth: int) -> dict[str, Any]:
        if depth > C.MAX_SCHEMA_DEPTH:
            raise SchemaError(at, None, f"the schema nests deeper than {C.MAX_SCHEMA_DEPTH} levels")
        self.nodes += 1
        if self.nodes > C.MAX_SCHEMA_NODES:
            raise SchemaError(at, None, f"the schema has more than {C.MAX_SCHEMA_NODES} subschemas")
        if not isinstance(node, dict):
            raise SchemaError(
                at,
                None,
                "a subschema must be a JSON object (true/false only as additionalProperties)",
            )
        for key in node:
            if key in UNSUPPORTED:
                raise SchemaError(f"{at}/{_escape(key)}", key, f"{key} is not supported")
        out = {k: v for k, v in node.items() if k not in ANNOTATIONS}
        keys = set(out)
        if "$ref" in out:
            self.only(node, at, {"$ref"}, "$ref")
            return {"$ref": self.resolve(out["$ref"], f"{at}/$ref", depth)}
        if "allOf" in out:
            parts = out["allOf"]
            if not isinstance(parts, list) or len(parts) != 1:
                raise SchemaError(f"{at}/allOf", "allOf", "allOf is supported with one schema only")
            self.only(node, at, {"allOf"}, "allOf")
            return self.visit(parts[0], f"{at}/allOf/0", depth + 1)
        for union in ("anyOf", "oneOf"):
            if union in out:
                self.only(node, at, {union}, union)
                alts = out[union]
                if not isinstance(alts, list) or not alts:
                    raise SchemaError(f"{at}/{union}", union, f"{union} must be a non-empty list")
                done = [self.visit(a, f"{at}/{union}/{i}", depth + 1) for i, a in enumerate(alts)]
                if union == "oneOf" and not self.exclusive(done):
                    raise SchemaError(
                        f"{at}/oneOf",
                        "oneOf",
                        "oneOf is supported only when its alternatives cannot overlap (distinct "
                        "types, or objects told apart by a required const property); use anyOf",
                    )
                return {"anyOf": done}
        kind = out.get("type")
        if isinstance(kind, list):
            if not kind or any(t not in TYPES for t in kind):
                raise SchemaError(f"{at}/type", "type", f"type must be one or more of {TYPES}")
            self.only(node, at, {"type"}, "a list of types")
            return {"anyOf": [{"type": t} for t in kind]}
        if kind is not None and kind not in TYPES:
            raise SchemaError(f"{at}/type", "type", f"type must be one of {', '.join(TYPES)}")
        if "const" in out or "enum" in out:
            word = "const" if "const" in out else "enum"
            self.only(node, at, {word, "type"}, word)
            if word == "enum" and (not isinstance(out["enum"], list) or not out["enum"]):
                raise SchemaError(f"{at}/enum", "enum", "enum must be a non-empty list")
            return {word: out[word]}
        if kind in (None, "object") and keys & {"properties", "required", "additionalProperties"}:
            return self.object(out, at, depth)
        if kind in (None, "array") and keys & {"items", "prefixItems", "minItems", "maxItems"}:
            return self.array(out, at, depth)
        if kind in (None, "string") and keys & {"pattern", "format", "minLength", "maxLength"}:
            return self.string(out, at)
        if "uniqueItems" in out and out["uniqueItems"] is not False:
            raise SchemaError(f"{at}/uniqueItems", "uniqueItems", "uniqueItems is not supported")
        return {"type": kind} if kind else {}

    def only(self, node: dict, at: str, allowed: set[str], what: str) -> None:
        """Beside `what`, a node may hold annotations (and `allowed`) only: the converter
        would drop anything else."""
        for key in node:
            if key not in allowed and key not in ANNOTATIONS:
                raise SchemaError(
                    f"{at}/{_escape(key)}", key, f"{key} is not supported beside {what}"
                )

    def resolve(self, ref: Any, at: str, depth: int) -> str:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(at, "$ref", "only references inside the schema (#/...) are supported")
        if ref not in self.ref_names:
            name = f"{REF_PREFIX}{self.prefix}{len(self.ref_names)}"
            self.ref_names[ref] = name
            target = self.root
            for part in ref[1:].split("/")[1:] if ref != "#" else []:
                part = part.replace("~1", "/").replace("~0", "~")
                if isinstance(target, dict) and part in target:
                    target = target[part]
                elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                    target = target[int(part)]
                else:
                    raise SchemaError(at, "$ref", f"$ref {ref[:100]} points to nothing")
            self.defs[name] = {}  # a placeholder: a recursive reference finds its name
            self.defs[name] = self.visit(target, ref[1:], depth + 1)
        return f"#/$defs/{self.ref_names[ref]}"

    def object(self, out: dict, at: str, depth: int) -> dict[str, Any]:
        self.only(out, at, {"type", "properties", "required", "additionalProperties"}, "an object")
        props = out.get("properties", {})
        if not isinstance(props, dict):
            raise SchemaError(f"{at}/properties", "properties", "properties must be an object")
        required = out.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError(f"{at}/required", "required", "required must be a list of names")
        for name in required:
            if name not in props:
                raise SchemaError(
                    f"{at}/required",
                    "required",
                    f"required names {name[:64]!r}, which is not among the properties",
                )
        result: dict[str, Any] = {
            "type": "object",
            "required": required,
            "properties": {
                name: self.visit(sub, f"{at}/properties/{_escape(name)}", depth + 1)
                for name, sub in props.items()
            },
        }
        extra = out.get("additionalProperties")
        if isinstance(extra, bool):
            result["additionalProperties"] = extra
        elif extra is not None:
            result["additionalProperties"] = self.visit(
                extra, f"{at}/additionalProperties", depth + 1
            )
        return result

    def array(self, out: dict, at: str, depth: int) -> dict[str, Any]:
        if "prefixItems" in out or isinstance(out.get("items"), list):
            word = "prefixItems" if "prefixItems" in out else "items"
            allowed = {"type", word} | ({"items"} if out.get("items") is False else set())
            self.only(out, at, allowed, word)
            items = out[word]
            if not isinstance(items, list) or not items:
                raise SchemaError(f"{at}/{word}", word, f"{word} must be a non-empty list")
            return {
                "type": "array",
                "prefixItems": [
                    self.visit(s, f"{at}/{word}/{i}", depth + 1) for i, s in enumerate(items)
                ],
            }
        self.only(out, at, {"type", "items", "minItems", "maxItems", "uniqueItems"}, "items")
        if out.get("uniqueItems", False) is not False:
            raise SchemaError(f"{at}/uniqueItems", "uniqueItems", "uniqueItems is not supported")
        least, most = self.bounds(out, at, "minItems", "maxItems")
        items = self.visit(out.get("items", {}), f"{at}/items", depth + 1)
        result = {"type": "array", "items": items or {"type": "object"}, "minItems": least}
        if not items:  # any value: the converter's generic rule, which takes no bounds
            if (least, most) != (0, None):
                raise SchemaError(f"{at}/minItems", "minItems", "minItems and maxItems need items")
            return {"type": "array"}
        if most is not None:
            result["maxItems"] = most
        return result

    def string(self, out: dict, at: str) -> dict[str, Any]:
        if "pattern" in out:
            self.only(out, at, {"type", "pattern"}, "pattern")
            pattern = out["pattern"]
            if not isinstance(pattern, str) or not PATTERN_OK.fullmatch(pattern) or "[^" in pattern:
                raise SchemaError(
                    f"{at}/pattern",
                    "pattern",
                    "pattern must be anchored (^...$) and use only literals, character classes "
                    'that are not negated, groups, | and quantifiers (no ".", escapes or quotes)',
                )
            product = 1
            for m in QUANTIFIER.finditer(pattern):
                product *= max(int(m.group(1)), int(m.group(2) or 0)) or 1
            if product > C.MAX_SCHEMA_REPEAT:
                raise SchemaError(
                    f"{at}/pattern",
                    "pattern",
                    f"pattern's counted repetitions multiply to over {C.MAX_SCHEMA_REPEAT}",
                )
            return {"type": "string", "pattern": pattern}
        if "format" in out:
            self.only(out, at, {"type", "format"}, "format")
            if out["format"] not in FORMATS:
                raise SchemaError(
                    f"{at}/format", "format", f"format must be one of {', '.join(FORMATS)}"
                )
            return {"type": "string", "format": out["format"]}
        self.only(out, at, {"type", "minLength", "maxLength"}, "minLength/maxLength")
        least, most = self.bounds(out, at, "minLength", "maxLength")
        result: dict[str, Any] = {"type": "string", "minLength": least}
        if most is not None:
            result["maxLength"] = most
        return result

    @staticmethod
    def bounds(out: dict, at: str, low: str, high: str) -> tuple[int, int | None]:
        values = []
        for word in (low, high):
            v = out.get(word)
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= C.MAX_SCHEMA_REPEAT
            ):
                limit = C.MAX_SCHEMA_REPEAT
                raise SchemaError(
                    f"{at}/{word}", word, f"{word} must be an integer from 0 to {limit}"
                )
            values.append(v)
        least, most = values[0] or 0, values[1]
        if most is not None and most < least:
            raise SchemaError(f"{at}/{high}", high, f"{high} is below {low}")
        return least, most

    def exclusive(self, alts: list[dict[str, Any]]) -> bool:
        """Whether no value can match two of these (normalized) alternatives: each has a
        single type that no other has (integer and number overlap), or each is an object
        with one required property whose const values all differ."""
        alts = [self.defs.get(a["$ref"].rsplit("/", 1)[1], a) if "$ref" in a else a for a in alts]
        kinds = [a.get("type") for a in alts]
        if all(isinstance(k, str) for k in kinds) and len(set(kinds)) == len(kinds):
            return not {"integer", "number"} <= set(kinds)
        if not all(k == "object" for k in kinds):
            return False
        shared = set.intersection(*(set(a.get("required", ())) for a in alts))
        for name in shared:
            consts = [a["properties"].get(name, {}) for a in alts]
            if all("const" in c for c in consts):
                values = [repr(c["const"]) for c in consts]
                if len(set(values)) == len(values):
                    return True
        return False


def _escape(key: str) -> str:
    """A JSON pointer's reference token (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")
