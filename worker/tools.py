"""Tool calls in llama.cpp's "generic" format (common/chat.cpp), for chat templates that
know no tools (SmolLM2's, and the built-in gemma one, which llmsup's catalog models use).

The model is told the tools in a system message and answers with one JSON object, which a
grammar enforces: `{"tool_call": {"name": ..., "arguments": {...}}}` (or `"tool_calls"`:
a list, with parallel_tool_calls) where each call's arguments follow that tool's parameter
schema, or, unless tool_choice requires a call, `{"response": "..."}` (the reply, a string,
or whatever the request's json_schema says). History is written the same way: an
assistant's earlier calls as that JSON, a tool's result as a user message holding
`{"tool_response": {"tool": name, "tool_call_id": id, "content": ...}}`, as llama.cpp's
template polyfills do.

`Answer` reads the output as it streams: the text of a string `response` is streamed
(unescaped) as it comes; a call is held and returned whole at the end, when its arguments
are complete.
"""

from __future__ import annotations

import json
import os
import re

import orjson

from llmsup.protocol import constants as C
from llmsup.protocol import schema_subset
from llmsup.protocol.messages import Chat, Message, ToolCall

SYSTEM = (
    "You can call these tools (JSON Schemas of their arguments):\n{tools}\n"
    "Respond in JSON, either with `{call}` ({what}) or with `response` (your reply to the "
    "user's request)."
)
SYSTEM_REQUIRED = (
    "You can call these tools (JSON Schemas of their arguments):\n{tools}\n"
    "Respond in JSON with `{call}` ({what})."
)
START = re.compile(r'\s*\{\s*"(response|tool_calls?)"\s*:\s*')


def uses_tools(chat: Chat) -> bool:
    return bool(chat.tools) and chat.tool_choice != "none"


def prompt_messages(chat: Chat) -> tuple[Message, ...]:
    """The conversation as the model reads it in the generic format: roles the template
    knows (system, user, assistant), the tools described in the system message."""
    names: dict[str, str] = {}  # call id -> tool name, for the tool results
    out: list[Message] = []
    for m in chat.messages:
        if m.tool_calls:
            for call in m.tool_calls:
                names[call.id] = call.name
            out.append(Message("assistant", _calls_json(m.tool_calls, chat.parallel_tool_calls)))
        elif m.role == "tool":
            result = {"tool": names.get(m.tool_call_id or "", ""), "tool_call_id": m.tool_call_id}
            result["content"] = m.content
            out.append(Message("user", orjson.dumps({"tool_response": result}).decode()))
        else:
            out.append(m)
    if not uses_tools(chat):
        return tuple(out)
    offered = [t for t in chat.tools if chat.tool_choice in ("auto", "required", t.name)]
    described = "\n".join(
        orjson.dumps(
            {"name": t.name, "description": t.description, "parameters": orjson.loads(t.parameters)}
        ).decode()
        for t in offered
    )
    call = "tool_calls" if chat.parallel_tool_calls else "tool_call"
    what = (
        "a list of calls, each with the tool's `name` and its `arguments`"
        if chat.parallel_tool_calls
        else "a call of one tool: its `name` and its `arguments`"
    )
    text = (SYSTEM if chat.tool_choice == "auto" else SYSTEM_REQUIRED).format(
        tools=described, call=call, what=what
    )
    if out and out[0].role == "system":
        return (Message("system", f"{out[0].content}\n\n{text}"), *out[1:])
    return (Message("system", text), *out)


def _calls_json(calls: tuple[ToolCall, ...], parallel: bool) -> str:
    def one(call: ToolCall):
        try:
            arguments = json.loads(call.arguments)
        except ValueError:
            arguments = call.arguments
        return {"name": call.name, "arguments": arguments}

    if parallel or len(calls) > 1:
        return orjson.dumps({"tool_calls": [one(c) for c in calls]}).decode()
    return orjson.dumps({"tool_call": one(calls[0])}).decode()


def output_schema(chat: Chat, response_schema: str | None) -> dict:
    """The JSON schema of the answer (grammar.py makes it a grammar). Each tool's parameters
    are inlined under their own $defs names (schema_subset.normalize's prefix)."""
    defs: dict = {}
    calls = []
    for i, tool in enumerate(chat.tools):
        if chat.tool_choice not in ("auto", "required", tool.name):
            continue
        params = schema_subset.normalize(orjson.loads(tool.parameters), prefix=f"t{i}-")
        defs.update(params.pop("$defs", {}))
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"const": tool.name}, "arguments": params},
                "required": ["name", "arguments"],
            }
        )
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if chat.parallel_tool_calls:
        schema: dict = {
            "type": "object",
            "properties": {
                "tool_calls": {
                    "type": "array",
                    "items": call,
                    "minItems": 1,
                    "maxItems": C.MAX_PARALLEL_CALLS,
                }
            },
            "required": ["tool_calls"],
        }
    else:
        schema = {"type": "object", "properties": {"tool_call": call}, "required": ["tool_call"]}
    if chat.tool_choice == "auto":
        response = orjson.loads(response_schema) if response_schema else {"type": "string"}
        if response_schema:
            response = schema_subset.normalize(response, prefix="r-")
            defs.update(response.pop("$defs", {}))
        reply = {"type": "object", "properties": {"response": response}, "required": ["response"]}
        schema = {"anyOf": [schema, reply]}
    if defs:
        schema["$defs"] = defs
    return schema


class Answer:
    """The model's output in the generic format, read as it streams."""

    def __init__(self):
        self.raw = ""
        self.kind: str | None = None  # "response" or "tool_call(s)", once known
        self.string = False  # a string response: its text is streamed
        self.at = 0  # in raw: how far the string response was streamed
        self.closed = False  # the response string ended

    def feed(self, text: str) -> str:
        """Take more output; the reply text to stream now."""
        self.raw += text
        if self.kind is None:
            m = START.match(self.raw)
            if m is None:
                return ""
            self.kind = m.group(1)
            rest = self.raw[m.end() :]
            if self.kind == "response" and rest[:1] == '"':
                self.string, self.at = True, m.end() + 1
            elif self.kind == "response" and not rest:
                self.kind = None  # the value has not begun: wait for it
                return ""
        return self._unescape() if self.string else ""

    def _unescape(self) -> str:
        out = []
        raw, i = self.raw, self.at
        while i < len(raw) and not self.closed:
            c = raw[i]
            if c == '"':
                self.closed = True
                i += 1
                break
            if c != "\\":
                j = i
                while j < len(raw) and raw[j] not in '"\\':
                    j += 1
                out.append(raw[i:j])
                i = j
                continue
            size = 2 if raw[i + 1 : i + 2] != "u" else 6
            if size == 6 and raw[i + 2 : i + 4].lower() in ("d8", "d9", "da", "db"):
                size = 12  # a high surrogate: its low half follows
            if i + size > len(raw):
                break  # the escape is not complete yet
            try:
                out.append(json.loads('"' + raw[i : i + size] + '"'))
            except ValueError:
                out.append(raw[i : i + size])
            i += size
        self.at = i
        return "".join(out)

    def finish(self, complete: bool) -> tuple[str, list[ToolCall]]:
        """At the end: the reply text not streamed yet and the calls. `complete`: the
        grammar finished the object (else it was cut by max_tokens: no calls)."""
        if not complete:
            return "", []
        try:
            value = json.loads(self.raw)
        except ValueError:
            return "", []
        if "response" in value:
            reply = value["response"]
            if self.string:
                return "", []
            return (reply if isinstance(reply, str) else orjson.dumps(reply).decode()), []
        calls = value.get("tool_calls") or [value.get("tool_call")]
        return "", [
            ToolCall(
                "call_" + os.urandom(12).hex(),
                c["name"],
                orjson.dumps(c.get("arguments", {})).decode(),
            )
            for c in calls
            if isinstance(c, dict)
        ]
