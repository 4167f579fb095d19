"""The bound a `grammar` (GBNF) is checked against before llama.cpp parses it (SPEC.md 3.11).

llama.cpp expands a counted repetition (`x{n,m}`) into n to m copies of `x` when it parses
the grammar, and a repeated group into copies of everything in it: `("a"{1000}){1000}`
is a million symbols, and a few more levels exhaust the worker's memory before the first
token. The size limit on the text does not catch that, so the copies a grammar makes are
counted here, without llama.cpp: at most MAX_SCHEMA_REPEAT for any one repetition (its
count times what is inside it) and 16 times that for the whole grammar. Repetitions of a
rule's name copy the name only, not the rule, and are counted like any element.
"""

from __future__ import annotations

import re

from llmsup.protocol import constants as C

COUNT = re.compile(r"\{\s*(\d{1,9})\s*(?:,\s*(\d{0,9})\s*)?\}")
TOTAL_COPIES = 16 * C.MAX_SCHEMA_REPEAT


def copies_problem(grammar: str) -> str | None:
    """Why the grammar's counted repetitions would make too many copies, or None."""
    stack = [1]  # per open group: the most copies any element inside it makes
    last = 1  # copies the element just read makes (a group: its inside's)
    total = 0
    i, n = 0, len(grammar)
    while i < n:
        c = grammar[i]
        if c == "#":  # a comment, to the end of the line
            end = grammar.find("\n", i)
            i = n if end < 0 else end
        elif c in '"[':  # a literal or a character class: skipped, escapes included
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and grammar[i] != close:
                i += 2 if grammar[i] == "\\" else 1
            last = 1
        elif c == "(":
            stack.append(1)
        elif c == ")":
            last = stack.pop() if len(stack) > 1 else 1
            stack[-1] = max(stack[-1], last)
        elif c == "{":
            m = COUNT.match(grammar, i)
            if m is None:
                i += 1
                continue
            low, high = int(m.group(1)), m.group(2)
            count = int(high) if high else low
            copies = last * max(count, 1)
            if copies > C.MAX_SCHEMA_REPEAT:
                return (
                    f"a counted repetition makes {copies} copies; the limit is "
                    f"{C.MAX_SCHEMA_REPEAT}"
                )
            total += copies
            if total > TOTAL_COPIES:
                return f"counted repetitions make over {TOTAL_COPIES} copies together"
            stack[-1] = max(stack[-1], copies)
            last = copies
            i = m.end()
            continue
        elif not c.isspace() and c not in "|*+?:=":
            last = 1
        i += 1
    return None
