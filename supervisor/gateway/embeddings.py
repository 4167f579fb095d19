"""POST /v1/embeddings in OpenAI's shape: llmsup's `embed` verb (SPEC.md 3.15).

`input` is a string or a list of strings (token-id inputs are refused: llmsup embeds
text); `encoding_format` float or base64 (little-endian float32, which the openai SDK asks
for by default and decodes); `dimensions` is refused unless it is the model's size (no
model here can shorten its vectors). Vectors are normalized to unit length, as OpenAI's.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from llmsup.protocol import constants as C
from llmsup.supervisor.gateway.errors import bad
from llmsup.supervisor.gateway.generate import read_json
from llmsup.supervisor.gateway.state import GATEWAY, MODEL
from llmsup.supervisor.gateway.tokens import ask


async def embeddings(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    raw = await read_json(request, gw.max_body_bytes)
    given = raw.get("input")
    inputs = [given] if isinstance(given, str) else given
    if not isinstance(inputs, list) or not inputs:
        raise bad("input must be a string or a non-empty list of strings", "input")
    if not all(isinstance(text, str) for text in inputs):
        raise bad("input must hold strings: token-id inputs are not supported", "input")
    if any(not text for text in inputs):
        raise bad("input must not hold an empty string", "input")
    encoding = raw.get("encoding_format") or "float"
    if encoding not in C.EMBED_ENCODINGS:
        raise bad(
            f"encoding_format must be one of {', '.join(C.EMBED_ENCODINGS)}", "encoding_format"
        )
    dimensions = raw.get("dimensions")
    if dimensions is not None and (type(dimensions) is not int or dimensions < 1):
        raise bad("dimensions must be a positive integer", "dimensions")
    body: dict[str, Any] = {"input": inputs}
    if encoding != "float":
        body["encoding_format"] = encoding
    done = await ask(request, gw, C.EMBED, body, raw)
    if dimensions is not None and dimensions != done["dimensions"]:
        raise bad(
            f"dimensions {dimensions} is not this model's size; it gives {done['dimensions']} "
            "and cannot shorten them (leave dimensions out)",
            "dimensions",
        )
    tokens = done["usage"]["prompt_tokens"]
    data = [
        {"object": "embedding", "index": i, "embedding": vector}
        for i, vector in enumerate(done["embeddings"])
    ]
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "model": request[MODEL],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )
