"""POST /tokenize and /detokenize as llama-server names them (also under /v1/): llmsup's
`tokenize` and `detokenize` verbs (SPEC.md 3.5, 3.14).

/tokenize takes {"content": text, "add_special": false, "with_pieces": false, "model"}
and answers {"tokens": [ids]}, or with with_pieces {"tokens": [{"id", "piece"}]} (a piece
that is not UTF-8 as its byte values); as on llama-server, no BOS token unless
add_special. /detokenize takes {"tokens": [ids], "model"} and answers {"content": text}.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from llmsup.protocol import constants as C
from llmsup.supervisor.gateway.errors import ApiError, bad, from_llmsup
from llmsup.supervisor.gateway.generate import read_json
from llmsup.supervisor.gateway.state import GATEWAY, MODEL, Gateway
from llmsup.supervisor.gateway.upstream import UpstreamError


async def tokenize(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    raw = await read_json(request, gw.max_body_bytes)
    content = raw.get("content")
    if not isinstance(content, str):
        raise bad("content must be a string", "content")
    body: dict[str, Any] = {"text": content}
    for name in ("add_special", "with_pieces"):
        value = raw.get(name)
        if value is not None and not isinstance(value, bool):
            raise bad(f"{name} must be true or false", name)
    if not content:  # llmsup's tokenize takes no empty text; llama-server answers this
        return web.json_response({"tokens": []})
    body["add_special"] = bool(raw.get("add_special"))
    if raw.get("with_pieces"):
        body["with_pieces"] = True
    done = await ask(request, gw, C.TOKENIZE, body, raw)
    tokens = done["tokens"]
    if raw.get("with_pieces"):
        pieces = done.get("pieces") or []
        return web.json_response(
            {"tokens": [{"id": t, "piece": p} for t, p in zip(tokens, pieces, strict=False)]}
        )
    return web.json_response({"tokens": tokens})


async def detokenize(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    raw = await read_json(request, gw.max_body_bytes)
    tokens = raw.get("tokens")
    if isinstance(tokens, list) and not tokens:  # llama-server answers this too
        return web.json_response({"content": ""})
    done = await ask(request, gw, C.DETOKENIZE, {"tokens": tokens}, raw)
    return web.json_response({"content": done["text"]})


async def ask(
    request: web.Request, gw: Gateway, verb: bytes, body: dict[str, Any], raw: dict[str, Any]
) -> dict[str, Any]:
    """One llmsup request answered by its DONE body; an error becomes OpenAI's."""
    requested = raw.get("model")
    if requested is not None and not isinstance(requested, str):
        raise bad("model must be a string", "model")
    model = await gw.model_for(requested)
    request[MODEL] = model
    if requested is not None:
        body["model"] = model
    try:
        return await gw.upstream.answer(verb, body)
    except UpstreamError as exc:
        raise _error(exc.body, verb) from None


def _error(reply: dict[str, Any], verb: bytes) -> ApiError:
    """llmsup's `text` field is llama-server's `content`; an embed input over the context
    is OpenAI's param `input` (llmsup names it in the message: SPEC.md 3.15)."""
    if reply.get("field") == "text" and verb == C.TOKENIZE:
        reply = {**reply, "field": "content"}
    if reply.get("code") == C.E_CONTEXT_OVERFLOW and verb == C.EMBED:
        reply = {**reply, "field": "input"}
    return from_llmsup(reply, None)
