"""JSON schemas as GBNF grammars, converted once per schema and kept by its hash.

The schema was checked at the edge (protocol/schema_subset.py: only what converts exactly,
bounded in depth and repetition); here it is normalized the same way and handed to
llama-cpp-python's converter (a port of llama.cpp's json_schema_to_grammar), with one
correction: its `char` rule lets control characters into strings, which JSON forbids, so
a string could end up invalid JSON; llama.cpp's own converter excludes them, and so does
this one. A grammar over MAX_GRAMMAR_BYTES is refused like an oversized `grammar` field.
"""

from __future__ import annotations

import collections
import hashlib

import orjson

from llmsup.protocol import constants as C
from llmsup.protocol import schema_subset

CACHE_ENTRIES = 64
# JSON's characters in a string: no quote or backslash unescaped, no control character.
CHAR_RULE = (
    r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] '
    r"[0-9a-fA-F])"
)

_cache: collections.OrderedDict[bytes, str] = collections.OrderedDict()


class GrammarError(ValueError):
    """A schema or grammar this worker cannot turn into a working grammar."""


def from_schema(schema_json: str) -> str:
    """The GBNF of a schema given as compact JSON; GrammarError if it cannot be made."""
    key = hashlib.blake2b(schema_json.encode(), digest_size=16).digest()
    grammar = _cache.get(key)
    if grammar is None:
        grammar = convert(orjson.loads(schema_json))
        _cache[key] = grammar
        if len(_cache) > CACHE_ENTRIES:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
    return grammar


def convert(schema: dict) -> str:
    from llama_cpp import llama_grammar as lg  # llama-cpp-python's converter

    try:
        normalized = schema_subset.normalize(schema)
    except schema_subset.SchemaError as exc:
        raise GrammarError(f"json_schema at {exc.pointer or '/'}: {exc}") from None

    class Converter(lg.SchemaConverter):
        def _add_primitive(self, name, rule):
            if rule is lg.PRIMITIVE_RULES["char"]:
                rule = lg.BuiltinRule(CHAR_RULE, [])
            return super()._add_primitive(name, rule)

    converter = Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        converter.visit(converter.resolve_refs(normalized, ""), "")
        grammar = converter.format_grammar()
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise GrammarError(f"json_schema could not be converted to a grammar: {exc}") from None
    if len(grammar) > C.MAX_GRAMMAR_BYTES:
        raise GrammarError(
            f"json_schema makes a grammar of {len(grammar)} bytes; the limit is "
            f"{C.MAX_GRAMMAR_BYTES} (fewer or smaller repetition bounds, enums or properties)"
        )
    return grammar
