"""Several models through the OpenAI HTTP gateway (issue 14): `llmsup start --http` with two
models, spoken to with the openai SDK and httpx. /v1/models lists both; a request's `model`
picks one (loaded on demand, `: loading` comments on a stream while it loads) and the
response names the model that answered; a name llmsup does not serve is OpenAI's 404
model_not_found; metrics and `llmsup top` show each worker's model."""

from __future__ import annotations

import time

import httpx
import openai
import orjson
import pytest

from tests.conftest import Instance, launched

pytestmark = pytest.mark.timeout(240)

DEFAULT = "gemma3-270m"
INSTRUCT = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "Name three large rivers."}]


@pytest.fixture(scope="module")
def served2():
    """2 workers x 1 core, both on the default at first; the instruct model on demand."""
    with launched(
        "--workers", "2", "--cores-per-worker", "1", "--model", DEFAULT, "--model", INSTRUCT,
        http=True,
    ) as inst:  # fmt: skip
        yield inst


def client(inst: Instance) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{inst.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_both_the_default_first(served2):
    models = client(served2).models.list().data
    assert [m.id for m in models] == [DEFAULT, INSTRUCT]
    assert all(m.object == "model" and m.owned_by == "llmsup" for m in models)
    assert client(served2).models.retrieve(INSTRUCT).id == INSTRUCT
    with pytest.raises(openai.NotFoundError) as err:
        client(served2).models.retrieve("llama-3-8b")
    assert err.value.code == "model_not_found" and err.value.param == "model"
    assert DEFAULT in err.value.message and INSTRUCT in err.value.message


def test_a_chat_on_the_instruct_model_is_loaded_and_answered_by_it(served2):
    assert [w["model"] for w in served2.status()["workers"]] == [DEFAULT, DEFAULT]
    # Streamed, raw: while a core group loads the model, the stream's comments say so.
    body = {
        "model": INSTRUCT,
        "messages": QUESTION,
        "max_tokens": 24,
        "temperature": 0,
        "stream": True,
    }
    comments, chunks = [], []
    sent, waited = time.monotonic(), None  # waited: until the first token
    with httpx.stream("POST", f"{served2.url}/v1/chat/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if line.startswith(":"):
                comments.append(line)
            elif line.startswith("data: {"):
                chunks.append(orjson.loads(line[6:]))
                if waited is None and chunks[-1]["choices"][0]["delta"].get("content"):
                    waited = time.monotonic() - sent
    assert chunks and {c["model"] for c in chunks} == {INSTRUCT}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text.strip()
    # Every wait was for the model to load (none for a slot), and a wait of over a
    # heartbeat (SPEC.md 4: one a second) was said.
    waits = [c for c in comments if c != ": running"]
    assert set(waits) <= {f": loading {INSTRUCT}"}, comments
    assert waits or (waited is not None and waited < 1.5), (waited, comments)
    assert sorted(w["model"] for w in served2.status()["workers"]) == [DEFAULT, INSTRUCT]

    # Whole, with the SDK: the same model answers the same question the same way.
    reply = client(served2).chat.completions.create(
        model=INSTRUCT, messages=QUESTION, max_tokens=24, temperature=0
    )
    assert reply.model == INSTRUCT and reply.choices[0].message.content == text
    # The default, named or not: it answers, and the response says so.
    plain = client(served2).completions.create(model=DEFAULT, prompt="The sky is", max_tokens=3)
    assert plain.model == DEFAULT and plain.usage.completion_tokens >= 1
    raw = httpx.post(f"{served2.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert raw.status_code == 200 and raw.json()["model"] == DEFAULT

    # Metrics: requests and tokens by model; core groups per model.
    metrics = httpx.get(f"{served2.url}/metrics").text
    for line in (
        f'llmsup_gateway_requests_total{{code="200",endpoint="/v1/chat/completions",'
        f'model="{INSTRUCT}"}} 2.0',
        f'llmsup_gateway_requests_total{{code="200",endpoint="/v1/completions",'
        f'model="{DEFAULT}"}} 2.0',
        f'llmsup_gateway_completion_tokens_total{{model="{INSTRUCT}"}}',
        f'llmsup_model_core_groups{{model="{INSTRUCT}"}} 1.0',
        f'llmsup_model_core_groups{{model="{DEFAULT}"}} 1.0',
    ):
        assert line in metrics, line

    # top: each worker's model, from the scoreboard.
    assert sorted(w["model"] for w in served2.top()["workers"]) == [DEFAULT, INSTRUCT]
    once = served2.cli("top", "--once")
    assert once.returncode == 0, once.stderr
    header, *rows = once.stdout.splitlines()[-3:]
    assert "MODEL" in header.split()
    assert sorted(row.split()[3] for row in rows) == [DEFAULT, INSTRUCT]


def test_a_model_llmsup_does_not_serve_is_404_naming_the_param(served2):
    for name in ("gpt-3.5-turbo", "", DEFAULT.upper(), "x" * 65):
        with pytest.raises(openai.NotFoundError) as err:
            client(served2).chat.completions.create(model=name, messages=QUESTION, max_tokens=2)
        assert err.value.status_code == 404, name
        assert err.value.code == "model_not_found" and err.value.param == "model", name
        assert err.value.type == "invalid_request_error"
    # Streamed too: refused before the stream starts, with its status code.
    with pytest.raises(openai.NotFoundError):
        client(served2).completions.create(model="gpt-4", prompt="x", stream=True)
    # Not a string: a bad value (400), as any other field's.
    bad = httpx.post(
        f"{served2.url}/v1/chat/completions", json={"model": ["a"], "messages": QUESTION}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"
    # Counted without a model: a name asked for is never a label value.
    metrics = httpx.get(f"{served2.url}/metrics").text
    assert 'code="404",endpoint="/v1/chat/completions",model=""' in metrics
