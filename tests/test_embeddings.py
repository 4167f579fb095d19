"""Embeddings (issue 28 item 2): the `embed` verb (SPEC.md 3.15) and POST /v1/embeddings,
against a real llmsup on SmolLM2 (mean pooling: a generation model names none), with the
openai SDK and LangChain's OpenAIEmbeddings; bad input answered with the field and the
limit while the next request is served; generation beside it undisturbed."""

from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path

import jsonschema
import numpy
import orjson
import pytest
import zmq

from llmsup.protocol import constants as C
from llmsup.protocol.client import LlmsupError

from .conftest import frames_until_end, launched

pytestmark = pytest.mark.timeout(300)

SMOL = "smollm2-135m-instruct"
TEXTS = ["The cat sat on the mat.", "A kitten rests on a rug.", "Stock markets fell sharply."]
SCHEMAS = Path(__file__).resolve().parent.parent / "protocol" / "schemas"
error_schema = jsonschema.Draft202012Validator(
    json.loads((SCHEMAS / "reply.error.json").read_text())
)


@pytest.fixture(scope="module")
def inst():
    with launched(
        "--model", SMOL, "--workers", "1", "--slots-per-worker", "2", "--ctx-size", "256",
        http=True,
    ) as inst:  # fmt: skip
        inst.url += "/v1"
        yield inst


def vectors(done: dict) -> numpy.ndarray:
    return numpy.array(done["embeddings"], dtype=numpy.float64)


def test_vectors_have_the_model_size_unit_length_and_meaning(inst):
    with inst.client() as client:
        done = client.embed(TEXTS)
        alone = client.embed(TEXTS[0])
        raw = client.embed(TEXTS[0], normalize=False)
        b64 = client.embed(TEXTS, encoding_format="base64")
    v = vectors(done)
    assert v.shape == (3, 576) and done["dimensions"] == 576 and done["pooling"] == "mean"
    assert numpy.allclose(numpy.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert done["usage"]["prompt_tokens"] > 3 * 4
    # A text alone gives what it gives in a batch; the same text the same vector.
    assert numpy.abs(vectors(alone)[0] - v[0]).max() < 1e-5
    # Not normalized: the same direction, another length.
    r = vectors(raw)[0]
    assert abs(numpy.linalg.norm(r) - 1.0) > 1e-3
    assert numpy.abs(r / numpy.linalg.norm(r) - v[0]).max() < 1e-5
    # base64: the same float32 numbers.
    decoded = numpy.array([numpy.frombuffer(base64.b64decode(s), "<f4") for s in b64["embeddings"]])
    assert numpy.abs(decoded - v).max() < 1e-6
    # Similar sentences are closer than unrelated ones.
    similarity = v @ v.T
    assert similarity[0, 1] > similarity[0, 2] and similarity[0, 1] > similarity[1, 2]


def test_openai_sdk_and_langchain_embeddings(inst):
    import openai
    from langchain_openai import OpenAIEmbeddings

    client = openai.OpenAI(base_url=inst.url, api_key="unused")
    as_base64 = client.embeddings.create(model=SMOL, input=TEXTS)  # the SDK asks base64
    as_float = client.embeddings.create(model=SMOL, input=TEXTS[0], encoding_format="float")
    assert [d.index for d in as_base64.data] == [0, 1, 2] and as_base64.model == SMOL
    assert len(as_base64.data[0].embedding) == 576
    assert (
        numpy.abs(
            numpy.array(as_base64.data[0].embedding) - numpy.array(as_float.data[0].embedding)
        ).max()
        < 1e-6
    )
    assert as_base64.usage.prompt_tokens == as_base64.usage.total_tokens > 0
    lc = OpenAIEmbeddings(
        model=SMOL, base_url=inst.url, api_key="unused", check_embedding_ctx_length=False
    )
    docs = lc.embed_documents(TEXTS)
    query = lc.embed_query(TEXTS[1])
    assert len(docs) == 3 and len(query) == 576
    assert numpy.abs(numpy.array(docs[1]) - numpy.array(query)).max() < 1e-5


def test_bad_input_names_the_field_and_the_limit(inst):
    import openai

    client = openai.OpenAI(base_url=inst.url, api_key="unused", max_retries=0)
    cases = [
        ({"input": []}, "input"),
        ({"input": ["x"] * 100_000}, "input"),
        ({"input": [[1, 2, 3]]}, "input"),
        ({"input": "word " * 400}, "input"),  # over the 256-token context
        ({"input": "hello", "dimensions": 64}, "dimensions"),
        ({"input": "hello", "encoding_format": "int8"}, "encoding_format"),
    ]
    refused = []
    for body, field in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.post("/embeddings", body=body, cast_to=object)
        error = caught.value.body
        refused.append((field, error.get("param"), error.get("message")))
        assert client.embeddings.create(model=SMOL, input="still served").data
    assert all(field == param for field, param, _ in refused), refused
    messages = dict((f, m) for f, _, m in refused)
    assert "2048" in messages["input"] or "1 to" in messages["input"]
    assert "576" in messages["dimensions"]
    with inst.client() as c:
        with pytest.raises(LlmsupError) as too_long:
            c.embed(["word " * 400])
        assert too_long.value.code == C.E_CONTEXT_OVERFLOW
        error_schema.validate(too_long.value.body)  # `field` goes with bad_request only
        assert "input[0]" in too_long.value.message and "256" in too_long.value.message
        assert c.embed(["word " * 400], truncate=True)["usage"]["prompt_tokens"] == 256
        with pytest.raises(LlmsupError) as too_many:
            c.embed(["x"] * 400)  # 400 vectors of 576 floats do not fit one 4 MiB frame
        assert too_many.value.body["field"] == "input" and "298" in too_many.value.message
        assert len(c.embed(["x"] * 400, encoding_format="base64")["embeddings"]) == 400
        with pytest.raises(LlmsupError) as thousands:
            c.embed(["x"] * 100_000)
        assert thousands.value.body["field"] == "input" and "2048" in thousands.value.message


def test_generation_beside_embeddings_is_undisturbed(inst):
    prompt = "Once upon a time, in a small village by the sea,"
    with inst.client() as client:
        reference = client.complete(prompt, max_tokens=48, temperature=0).text()
    results: list[str] = []
    errors: list[str] = []

    def generate() -> None:
        try:
            with inst.client() as client:
                results.append(client.complete(prompt, max_tokens=48, temperature=0).text())
        except LlmsupError as exc:
            errors.append(repr(exc))

    thread = threading.Thread(target=generate)
    thread.start()
    with inst.client() as client:
        for _ in range(5):
            client.embed(TEXTS)
    thread.join(timeout=120)
    assert not errors and results == [reference]


# --- a large batch, computed a decode at a time between generation steps -----------------------

# 12 inputs of 241 tokens: seconds of decodes (a step here reads about 256 tokens a second).
BIG = ["word " * 240] * 12


@pytest.fixture(scope="module")
def touchy():
    """A worker that counts as hung after 4 s without progress (--stall-timeout 4): less
    than BIG takes, more than one step."""
    with launched(
        "--model", SMOL, "--workers", "1", "--slots-per-worker", "2", "--ctx-size", "256",
        "--stall-timeout", "4",
    ) as inst:  # fmt: skip
        yield inst


def test_a_large_batch_neither_stalls_generation_nor_looks_hung(touchy):
    """An embed of 2,900 tokens beside a generation: the generation streams and ends while
    the embed is still being computed, and the worker, beating after each decode, is not
    taken for hung though the batch takes longer than --stall-timeout."""
    prompt = "Once upon a time, in a small village by the sea,"
    with touchy.client() as client:
        reference = client.complete(prompt, max_tokens=4, temperature=0).text()
        alone = vectors(client.embed(BIG[:1]))
    pid = touchy.status()["workers"][0]["pid"]
    ctx = zmq.Context()
    sock = touchy.dealer(ctx)
    try:
        began = time.monotonic()
        sock.send_multipart([C.VERSION, C.EMBED, b"big", orjson.dumps({"input": BIG})])
        with touchy.client() as client:
            text = client.complete(prompt, max_tokens=4, temperature=0).text()
        generation_done = time.monotonic()
        frames = frames_until_end(sock, b"big")
        embed_done = time.monotonic()
    finally:
        sock.close(0)
        ctx.term()
    kind, done = frames[-1]
    assert kind == C.DONE, done
    assert text == reference
    # Its 4 tokens took a few of the embed's 12 decodes, not all of them.
    assert embed_done - generation_done > 0.25 * (embed_done - began), (
        f"the generation waited for the batch: done at {generation_done - began:.1f} s, "
        f"the embed at {embed_done - began:.1f} s"
    )
    got = vectors(done)
    assert got.shape == (12, 576) and numpy.abs(got[11] - alone[0]).max() < 1e-4
    assert done["usage"]["prompt_tokens"] == 12 * 241
    assert touchy.status()["workers"][0]["pid"] == pid, "the worker was restarted"
    assert "hung" not in touchy.log()


def test_a_cancel_stops_a_batch_between_decodes(touchy):
    ctx = zmq.Context()
    sock = touchy.dealer(ctx)
    try:
        sock.send_multipart([C.VERSION, C.EMBED, b"big", orjson.dumps({"input": BIG})])
        time.sleep(1.0)
        sock.send_multipart([C.VERSION, C.CANCEL, b"stop", orjson.dumps({"target": "big"})])
        frames = frames_until_end(sock, b"big")
    finally:
        sock.close(0)
        ctx.term()
    kind, error = frames[-1]
    assert (kind, error["code"]) == (C.ERROR, C.E_CANCELLED), error
    error_schema.validate(error)
    assert 0 < error["usage"]["prompt_tokens"] < 12 * 241, error  # stopped part way
    with touchy.client() as client:
        assert client.embed(TEXTS)["dimensions"] == 576  # and the worker serves on
