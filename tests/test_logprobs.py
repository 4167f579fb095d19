"""logprobs, echo, tokenize and detokenize (SPEC.md 3.5, 3.13, 3.14) through the protocol,
the CLI and the HTTP gateway (the openai SDK, httpx), against a real SmolLM2; and a
loglikelihood evaluation as lm-evaluation-harness's `local-completions` model sends it,
compared with llama.cpp's own llama-server on the same model.

lm-evaluation-harness itself is not installed (it pulls torch): the test sends the exact
request its LocalCompletionsAPI._create_payload builds for loglikelihood (`echo`,
`logprobs` 1, `max_tokens` 1, temperature 0, seed 1234; the prompt as text, as with
tokenized_requests=False) and reads the answer with the arithmetic of its parse_logprobs
(the sum of token_logprobs[ctxlen:-1], greedy if each equals the max of its top_logprobs).
"""

from __future__ import annotations

import math
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest
from testkit import free_port, stop_process

from llmsup.protocol import constants as C
from llmsup.protocol.client import LlmsupError
from llmsup.supervisor.models.catalog import catalog_path
from tests.conftest import launched

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
N_VOCAB = 49152  # SmolLM2's vocabulary
PROMPT = "The capital of France is"
# (context, continuation) pairs as a multiple-choice task has them: continuations begin
# with a space, so the two tokenized apart are the whole tokenized at once.
EXAMPLES = [
    ("The capital of France is", " Paris"),
    ("The capital of France is", " London"),
    ("Water boils at one hundred degrees", " Celsius at sea level"),
    ("One, two, three,", " four, five"),
]


@pytest.fixture(scope="module")
def inst():
    with launched(
        "--model", MODEL, "--workers", "1", "--cores-per-worker", "1",
        "--slots-per-worker", "4", "--ctx-size", "1024", http=True,
    ) as inst:  # fmt: skip
        yield inst


@pytest.fixture(scope="module")
def client(inst):
    with inst.client() as c:
        yield c


@pytest.fixture(scope="module")
def sdk(inst):
    return openai.OpenAI(base_url=f"{inst.url}/v1", api_key="unused", max_retries=0, timeout=60)


def check_entry(entry: dict, top: int) -> None:
    assert isinstance(entry["token"], int) and 0 <= entry["token"] < N_VOCAB
    assert math.isfinite(entry["logprob"]) and entry["logprob"] <= 0
    assert bytes(entry["bytes"]).decode(errors="replace") == entry["text"]
    assert len(entry["top_logprobs"]) == top
    values = [t["logprob"] for t in entry["top_logprobs"]]
    assert values == sorted(values, reverse=True)
    assert all(math.isfinite(v) and v <= 0 for v in values)


# --- the protocol ----------------------------------------------------------------------------


def test_greedy_logprobs_are_the_top_ones(client):
    stream = client.complete(PROMPT, max_tokens=12, temperature=0, logprobs=True, top_logprobs=5)
    text = stream.text()
    entries = stream.logprobs
    assert stream.done["usage"]["completion_tokens"] == len(entries) > 0
    assert "".join(e["text"] for e in entries) == text
    for entry in entries:
        check_entry(entry, 5)
        best = entry["top_logprobs"][0]
        assert (
            entry["logprob"] == best["logprob"] == max(t["logprob"] for t in entry["top_logprobs"])
        )
        assert entry["token"] == best["token"]
    assert entries[0]["text"] == " Paris"


def test_logprobs_with_sampling_and_stop(client):
    """Sampling: the chosen token need not be the likeliest, but its logprob is the
    model's; a stop string: no entry for tokens past it."""
    stream = client.complete(
        "Count: one, two, three,", max_tokens=16, temperature=1.0, seed=7, logprobs=True,
        top_logprobs=2, stop=[" six"],
    )  # fmt: skip
    text = stream.text()
    for entry in stream.logprobs:
        check_entry(entry, 2)
    assert " six" not in text
    joined = "".join(e["text"] for e in stream.logprobs)
    assert joined.startswith(text)
    assert len(joined) - len(text) < 16


def test_no_logprobs_unless_asked(client):
    stream = client.complete(PROMPT, max_tokens=4, temperature=0)
    stream.text()
    assert stream.logprobs == []
    assert "prompt_logprobs" not in stream.done


def test_chat_logprobs(client):
    stream = client.chat(
        [{"role": "user", "content": "Name a color."}], max_tokens=6, temperature=0,
        logprobs=True, top_logprobs=3,
    )  # fmt: skip
    text = stream.text()
    assert "".join(e["text"] for e in stream.logprobs) == text
    for entry in stream.logprobs:
        check_entry(entry, 3)


def test_echo_gives_every_prompt_token(inst, client):
    before = inst.status()["cache"]
    stream = client.complete(PROMPT, max_tokens=0, echo=True, logprobs=True, top_logprobs=2)
    assert stream.text() == ""
    done = stream.done
    assert done["finish_reason"] == "length"
    assert done["usage"]["completion_tokens"] == 0
    assert done["usage"]["cached_tokens"] == 0
    prompt = done["prompt_logprobs"]
    tokens = client.tokenize(PROMPT)
    assert [e["token"] for e in prompt] == tokens
    assert prompt[0]["logprob"] is None and prompt[0]["top_logprobs"] is None
    for entry in prompt[1:]:
        check_entry(entry, 2)
    assert "".join(e["text"] for e in prompt) == PROMPT
    # It neither saved into nor restored from the prefix cache.
    after = inst.status()["cache"]
    assert (after["saves"], after["hits"]) == (before["saves"], before["hits"])

    # With a token generated: the prompt's entries as before, then the token's; and the
    # same figures as the same prompt read again (a prefix of it, here) within rounding.
    stream = client.complete(
        PROMPT + " Paris", max_tokens=1, temperature=0, echo=True, logprobs=True
    )
    stream.text()
    longer = stream.done["prompt_logprobs"]
    assert len(longer) == len(prompt) + 1
    for a, b in zip(prompt[1:], longer[1:], strict=False):
        assert a["token"] == b["token"]
        assert abs(a["logprob"] - b["logprob"]) < 1e-3
    assert len(stream.logprobs) == 1


def test_echo_leaves_other_sequences_alone(inst, client):
    """An echo read beside a generating request: its greedy output is what it is alone.
    (One connection per stream: the Python client reads one request at a time.)"""
    alone = client.complete("Once upon a time", max_tokens=24, temperature=0).text()
    with inst.client() as first, inst.client() as second:
        generating = first.complete("Once upon a time", max_tokens=24, temperature=0)
        echo = second.complete(
            "A long prompt for echo: " + "the quick brown fox jumps over the lazy dog, " * 8,
            max_tokens=0, echo=True, logprobs=True,
        )  # fmt: skip
        assert generating.text() == alone
        echo.text()
    assert len(echo.done["prompt_logprobs"]) == echo.done["usage"]["prompt_tokens"]


def test_a_prompt_of_token_ids_is_the_text_prompt(client):
    """SmolLM2 adds no BOS: the text and its ids are the same prompt."""
    ids = client.tokenize(PROMPT)
    by_text = client.complete(PROMPT, max_tokens=6, temperature=0).text()
    by_ids = client.stream(C.COMPLETE, {"tokens": ids, "max_tokens": 6, "temperature": 0})
    assert by_ids.text() == by_text
    assert by_ids.done["usage"]["prompt_tokens"] == len(ids)
    with pytest.raises(LlmsupError) as caught:
        client.call(C.COMPLETE, {"tokens": [*ids, N_VOCAB], "max_tokens": 1})
    assert caught.value.body["field"] == "tokens"


def test_tokenize_detokenize_round_trip(inst, client):
    text = "Héllo, wörld! <|im_start|> 12345"
    tokens = client.tokenize(text)
    assert client.detokenize(tokens) == text
    ids = inst.cli("tokenize", text)
    assert ids.returncode == 0, ids.stderr
    back = inst.cli("detokenize", *ids.stdout.split())
    assert back.returncode == 0, back.stderr
    assert back.stdout == text + "\n"
    done = client.call(C.TOKENIZE, {"text": "Hello world", "with_pieces": True})
    assert done["pieces"] == ["Hello", " world"]


def test_bad_input_is_named_and_the_next_request_served(client):
    cases = [
        (C.COMPLETE, {"prompt": "x", "logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
        (C.COMPLETE, {"prompt": "x", "top_logprobs": 2}, "top_logprobs", "logprobs"),
        (C.COMPLETE, {"prompt": "x", "echo": True}, "echo", "logprobs"),
        (C.COMPLETE, {"prompt": "x", "max_tokens": 0, "logprobs": True}, "max_tokens", "echo"),
        (C.CHAT, {"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo", "allowed"),
        (
            C.CHAT,
            {
                "messages": [{"role": "user", "content": "x"}],
                "logprobs": True,
                "tools": [{"type": "function", "function": {"name": "f"}}],
            },
            "logprobs",
            "tools",
        ),
        (C.DETOKENIZE, {"tokens": [1, N_VOCAB]}, "tokens", str(N_VOCAB - 1)),
        (C.DETOKENIZE, {"tokens": []}, "tokens", "131072"),
        # An echo whose prompt_logprobs would not fit one frame: refused by the worker.
        (
            C.COMPLETE,
            {"prompt": "word " * 800, "echo": True, "logprobs": True, "top_logprobs": 20},
            "echo",
            "16384",
        ),
    ]
    for verb, body, field, limit in cases:
        with pytest.raises(LlmsupError) as caught:
            client.call(verb, body)
        assert caught.value.code == C.E_BAD_REQUEST, (body, caught.value.body)
        assert caught.value.body.get("field") == field, caught.value.body
        assert limit in caught.value.message, caught.value.message
        assert client.complete(PROMPT, max_tokens=2, temperature=0).text()


# --- HTTP ------------------------------------------------------------------------------------


def test_openai_completions_echo_and_logprobs(sdk):
    whole = sdk.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    choice = whole.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(PROMPT) and choice.text[len(PROMPT) :] == "".join(lp.tokens[-3:])
    n_prompt = whole.usage.prompt_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n_prompt + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for chosen, top in zip(lp.token_logprobs[n_prompt:], lp.top_logprobs[n_prompt:], strict=True):
        assert chosen == max(top.values())  # greedy
    # Streamed: the same tokens and figures.
    chunks = list(
        sdk.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=2,
            stream=True,
        )
    )  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks)
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    values = [
        v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs
    ]
    assert text == choice.text and tokens == lp.tokens
    assert values[0] is None
    assert all(abs(a - b) < 1e-3 for a, b in zip(values[1:], lp.token_logprobs[1:], strict=True))
    # max_tokens 0 with echo: the prompt alone, with and without logprobs.
    alone = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    assert alone.choices[0].text == PROMPT and alone.usage.completion_tokens == 0
    assert alone.choices[0].logprobs.tokens == lp.tokens[:n_prompt]
    plain = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True)
    assert plain.choices[0].text == PROMPT and plain.choices[0].logprobs is None


def test_openai_completions_of_token_ids(sdk, client):
    ids = client.tokenize(PROMPT)
    for prompt in (ids, [ids]):
        reply = sdk.completions.create(
            model=MODEL, prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=1
        )
        choice = reply.choices[0]
        assert choice.text.startswith(PROMPT)
        assert len(choice.logprobs.tokens) == len(ids) + 2
    # echo without logprobs, streamed: the ids' text first.
    chunks = list(
        sdk.completions.create(
            model=MODEL, prompt=ids, max_tokens=2, temperature=0, echo=True, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert all(c.choices[0].logprobs is None for c in chunks)
    with pytest.raises(openai.BadRequestError) as err:
        sdk.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=1)
    assert err.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as err:
        sdk.completions.create(model=MODEL, prompt=[5, N_VOCAB], max_tokens=1)
    assert err.value.param == "prompt" and str(N_VOCAB - 1) in err.value.message


def test_openai_chat_logprobs(sdk):
    messages = [{"role": "user", "content": "Name a fruit."}]
    whole = sdk.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = whole.choices[0].logprobs.content
    assert "".join(t.token for t in content) == whole.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob == t.top_logprobs[0].logprob <= 0
        assert bytes(t.bytes).decode() == t.token
    streamed = list(
        sdk.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True,
            top_logprobs=3, stream=True,
        )
    )  # fmt: skip
    tokens = [
        t.token for c in streamed if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]  # fmt: skip
    assert tokens == [t.token for t in content]
    plain = sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_http_tokenize_detokenize(inst):
    with httpx.Client(base_url=inst.url, timeout=60) as http:
        for prefix in ("", "/v1"):
            tokens = http.post(f"{prefix}/tokenize", json={"content": PROMPT}).json()["tokens"]
            assert len(tokens) == 5
            back = http.post(f"{prefix}/detokenize", json={"tokens": tokens}).json()
            assert back == {"content": PROMPT}
        pieces = http.post("/tokenize", json={"content": "Hello world", "with_pieces": True})
        assert pieces.json() == {
            "tokens": [{"id": tokens_of(http, "Hello")[0], "piece": "Hello"},
                       {"id": tokens_of(http, " world")[0], "piece": " world"}]
        }  # fmt: skip
        assert http.post("/tokenize", json={"content": ""}).json() == {"tokens": []}
        bad = http.post("/detokenize", json={"tokens": [5, N_VOCAB + 10]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
        assert str(N_VOCAB - 1) in bad.json()["error"]["message"]
        bad = http.post("/tokenize", json={"content": 5})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "content"


def tokens_of(http: httpx.Client, text: str) -> list[int]:
    return http.post("/tokenize", json={"content": text}).json()["tokens"]


def test_http_bad_input(inst, sdk):
    cases = [
        ("/v1/completions", {"prompt": PROMPT, "logprobs": 6}, "logprobs", "5"),
        ("/v1/completions", {"prompt": PROMPT, "logprobs": True}, "logprobs", "integer"),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens", "echo"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                                  "top_logprobs": 21}, "top_logprobs", "20"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "top_logprobs": 2}, "top_logprobs", "logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "echo": True},
         "echo", "completions"),
    ]  # fmt: skip
    with httpx.Client(base_url=inst.url, timeout=60) as http:
        for path, body, param, limit in cases:
            reply = http.post(path, json=body)
            assert reply.status_code == 400, (body, reply.text)
            error = reply.json()["error"]
            assert error["param"] == param, error
            assert limit in error["message"], error
            assert sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1).choices


# --- a loglikelihood evaluation, against llama-server ------------------------------------------


def loglikelihood_request(context: str, continuation: str) -> dict:
    """What lm-evaluation-harness's LocalCompletionsAPI._create_payload sends for one
    loglikelihood request (generate=False), the prompt as text."""
    return {
        "model": MODEL,
        "prompt": context + continuation,
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }


def parse_logprobs(out: dict, ctxlen: int) -> tuple[float, bool]:
    """lm-evaluation-harness's LocalCompletionsAPI.parse_logprobs for one choice."""
    choice = out["choices"][0]
    assert ctxlen > 0
    logprobs = sum(choice["logprobs"]["token_logprobs"][ctxlen:-1])
    tokens_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    is_greedy = True
    for tok, top in zip(tokens_logprobs, top_logprobs, strict=False):
        if tok != max(top.values()):
            is_greedy = False
            break
    return logprobs, is_greedy


class LlamaServer:
    """llama.cpp's llama-server (perf/build-llama-server.sh builds it) on the same model."""

    def __enter__(self):
        built = subprocess.run(
            ["bash", str(ROOT / "perf" / "build-llama-server.sh")], capture_output=True, text=True
        )
        if built.returncode != 0:
            pytest.skip(f"llama-server could not be built: {built.stderr[-300:]}")
        self.port = free_port()
        self.log = tempfile.TemporaryFile()
        binary = built.stdout.strip().splitlines()[-1]
        cmd = [binary, "-m", str(catalog_path(MODEL)), "-t", "1", "-np", "1", "-c", "2048",
               "--host", "127.0.0.1", "--port", str(self.port)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "llama-server exited"
            try:
                if self.http.get("/health").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("llama-server did not become healthy")

    def __exit__(self, *exc):
        self.http.close()
        stop_process(self.proc)
        self.log.close()

    def next_token_logprob(self, tokens: list[int], token: int) -> tuple[float, bool]:
        """The logprob of `token` after `tokens` (n_probs: the raw logits' softmax) and
        whether it is the likeliest."""
        reply = self.http.post(
            "/completion",
            json={"prompt": tokens, "n_predict": 1, "n_probs": 200, "temperature": 0,
                  "cache_prompt": False},
        ).json()  # fmt: skip
        top = reply["completion_probabilities"][0]["top_logprobs"]
        found = [t["logprob"] for t in top if t["id"] == token]
        assert found, f"token {token} is not among llama-server's 200 likeliest"
        return found[0], top[0]["id"] == token


@pytest.fixture(scope="module")
def llama_server_figures(client):
    """For each example: its context's and its whole tokens (tokenized as the harness does:
    the whole, split where the context's tokens end), and llama-server's (sum of the
    continuation's logprobs, whether each token was the likeliest)."""
    figures = []
    with LlamaServer() as server:
        for context, continuation in EXAMPLES:
            ctx_tokens = client.tokenize(context)
            whole = client.tokenize(context + continuation)
            assert whole[: len(ctx_tokens)] == ctx_tokens
            total, greedy = 0.0, True
            for i in range(len(ctx_tokens), len(whole)):
                value, top = server.next_token_logprob(whole[:i], whole[i])
                total += value
                greedy = greedy and top
            figures.append((ctx_tokens, whole, total, greedy))
    return figures


def test_loglikelihood_as_lm_eval_sends_it_equals_llama_server(inst, llama_server_figures):
    with httpx.Client(base_url=inst.url, timeout=120) as http:
        for example, (ctx_tokens, whole, theirs, their_greedy) in zip(
            EXAMPLES, llama_server_figures, strict=True
        ):
            reply = http.post("/v1/completions", json=loglikelihood_request(*example))
            assert reply.status_code == 200, reply.text
            out = reply.json()
            assert len(out["choices"][0]["logprobs"]["tokens"]) == len(whole) + 1
            total, greedy = parse_logprobs(out, len(ctx_tokens))
            assert abs(total - theirs) < 1e-3, (example, total, theirs)
            assert greedy == their_greedy, example
    assert [f[3] for f in llama_server_figures] == [True, False, False, True]


class LlmsupTokenizer:
    """What the harness asks of a "remote" tokenizer (encode, batch_decode), through the
    gateway's llama-server routes: no BOS (add_special false), as the harness's own
    tokenizers encode."""

    def __init__(self, url: str):
        self.http = httpx.Client(base_url=url, timeout=60)

    def encode(self, text: str) -> list[int]:
        return self.http.post("/tokenize", json={"content": text}).json()["tokens"]

    def batch_decode(self, batch: list[list[int]]) -> list[str]:
        return [self.http.post("/detokenize", json={"tokens": t}).json()["content"] for t in batch]


@pytest.mark.parametrize("tokenized", [True, False], ids=["token-ids", "text"])
def test_lm_eval_local_completions_loglikelihood(inst, llama_server_figures, tokenized):
    """lm-evaluation-harness's own local-completions model (its request, its HTTP client,
    its parsing) against the gateway, the prompt as token ids (its default) or as text
    (tokenized_requests=False). Only the tokenizer is supplied here (no Hugging Face
    download): llmsup's /tokenize and /detokenize."""
    lm_eval_api = pytest.importorskip("lm_eval.models.openai_completions")
    from lm_eval.api.instance import Instance as Request

    lm = lm_eval_api.LocalCompletionsAPI(
        base_url=f"{inst.url}/v1/completions",
        model=MODEL,
        tokenizer_backend=None,
        max_retries=1,
        eos_string="<|im_end|>",  # SmolLM2-Instruct's (the remote tokenizer's would say)
    )
    lm.tokenizer_backend, lm.tokenizer = "remote", LlmsupTokenizer(inst.url)
    lm.tokenized_requests = tokenized
    requests = [
        Request(request_type="loglikelihood", doc={}, arguments=example, idx=i)
        for i, example in enumerate(EXAMPLES)
    ]
    results = lm.loglikelihood(requests, disable_tqdm=True)
    for example, (total, greedy), (_, _, theirs, their_greedy) in zip(
        EXAMPLES, results, llama_server_figures, strict=True
    ):
        assert abs(total - theirs) < 1e-3, (example, total, theirs)
        assert greedy == their_greedy, example
