"""The Python client for protocol v1, used by the CLI and the tests.

    with Client() as client:
        stream = client.complete("Once upon a time", max_tokens=32)
        for text in stream:
            print(text, end="")
        print(stream.done["usage"])
        hi = [{"role": "user", "content": "Hi"}]
        print(client.chat(hi, model="smollm2-135m-instruct").text())

A request names its model with `model=` (complete, chat, tokenize); without it the server's
default model answers. `status()["models"]` lists the served ones.

One Client is one DEALER socket; it runs one request at a time. Use one Client per thread
or per concurrent request.

Liveness (SPEC.md 4.1): the server sends a frame of every live request at least every
2 s, so `timeout` is a wait per frame, by default CLIENT_RECEIVE_TIMEOUT_MS (5 s). When it
passes, `ReplyTimeout` says the request may be lost: `ping()` and compare its instance with
the request's (`Stream.instance`, from its `accepted` frame) before sending it again.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import zmq

from llmsup.protocol import constants as C
from llmsup.protocol.statedir import StateDir, default_state_dir

_ids = itertools.count(1)


class LlmsupError(Exception):
    """An ERROR reply: `code` is one of constants.ERROR_CODES."""

    def __init__(self, body: dict[str, Any]):
        super().__init__(f"{body.get('code')}: {body.get('message')}")
        self.body = body
        self.code = body.get("code")
        self.message = body.get("message")
        self.retry_after_ms = body.get("retry_after_ms")


class ReplyTimeout(TimeoutError):
    """No frame of a request within the receive timeout: the request, or the server, may
    be lost (SPEC.md 4.1). `instance` is the server instance that accepted the request
    (None if no `accepted` frame came)."""

    def __init__(self, endpoint: str, request_id: bytes, timeout_ms: int, instance: str | None):
        where = f"instance {instance}" if instance else endpoint
        super().__init__(
            f"no frame for request {request_id.decode(errors='replace')!r} from {where} in "
            f"{timeout_ms / 1000:g}s: the request, or the server, may be lost. Ping the "
            "server: no answer means it is down; another instance means it restarted and "
            "the request is gone; resend it only if it is safe to repeat"
        )
        self.endpoint = endpoint
        self.request_id = request_id
        self.timeout_ms = timeout_ms
        self.instance = instance


class NotRunning(Exception):
    pass


def endpoint_from_state_dir(state_dir: str | Path | None = None) -> str:
    state = StateDir(Path(state_dir) if state_dir else default_state_dir())
    info = state.read_info()
    if info is None or state.running_pid() is None:
        raise NotRunning(f"llmsup is not running (no supervisor in {state.path})")
    return info["endpoint"]


def curve_keys_from_state_dir(
    state_dir: str | Path | None = None, endpoint: str | None = None
) -> dict[str, bytes] | None:
    """The CURVE keys a tcp client of this state dir uses (docs/security.md), or None when
    it has none or its running supervisor says tcp peers are not authenticated. The
    default state dir (`state_dir` None) lends its keys only to its own supervisor's
    `endpoint`: another server there is not ours."""
    state = StateDir(Path(state_dir) if state_dir else default_state_dir())
    if not state.check():
        return None
    info = state.read_info()
    if info is not None and info.get("tcp_auth") == "none":
        return None
    if state_dir is None and endpoint is not None:
        if info is None or info.get("endpoint") != endpoint:
            return None
    return state.client_curve_keys()


class Stream:
    """The replies to one request: iterate for streamed text; `done` holds the DONE body,
    `instance` the server instance that accepted it (from its `accepted` frame)."""

    def __init__(self, client: Client, request_id: bytes):
        self.client = client
        self.request_id = request_id
        self.done: dict[str, Any] | None = None
        self.instance: str | None = None
        self.logprobs: list[dict[str, Any]] = []  # with logprobs: one entry per token so far
        self.by_index: dict[int, list[str]] = {}  # with n above 1: each choice's texts so far

    def __iter__(self) -> Iterator[str]:
        while self.done is None:
            kind, body = self.client._receive(self.request_id, self.instance)
            if kind == C.TOKEN:
                self.logprobs.extend(body.get("logprobs", ()))
                self.by_index.setdefault(body.get("index", 0), []).append(body["text"])
                yield body["text"]
            elif kind == C.DONE:
                self.logprobs.extend(body.get("logprobs", ()))
                self.done = body
                if isinstance(body.get("instance"), str):  # ping and status carry it
                    self.client.instance = body["instance"]
            elif kind == C.ERROR:
                raise LlmsupError(body)
            elif kind == C.ACCEPTED:
                self.instance = self.client.instance = body.get("instance")
            # Other kinds (QUEUED, RUNNING heartbeats, or ones added later): no text.

    def text(self) -> str:
        return "".join(self)

    def choices(self) -> list[str]:
        """Each completion's text, by index, once the request has ended (with n above 1
        the frames of the n completions interleave: SPEC.md 3.16)."""
        for _ in self:
            pass
        n = len((self.done or {}).get("choices") or ()) or 1
        return ["".join(self.by_index.get(i, ())) for i in range(n)]


class Client:
    def __init__(
        self,
        endpoint: str | None = None,
        *,
        state_dir: str | Path | None = None,
        timeout: float | None = None,
        curve_keys: dict[str, bytes] | None = None,
    ):
        """`timeout`: the longest wait, in seconds, for the next frame of a request
        [CLIENT_RECEIVE_TIMEOUT_MS]; it is not a deadline for the whole request.
        `curve_keys`: {"server_key", "public_key", "secret_key"} (Z85) for a tcp endpoint;
        by default a tcp endpoint uses `state_dir`'s, or the default state dir's if it is
        that supervisor's endpoint."""
        self.endpoint = endpoint or endpoint_from_state_dir(state_dir)
        if curve_keys is None and self.endpoint.startswith("tcp://"):
            curve_keys = curve_keys_from_state_dir(state_dir, self.endpoint)
        if timeout is None:
            self.timeout_ms = C.CLIENT_RECEIVE_TIMEOUT_MS
        else:
            self.timeout_ms = int(timeout * 1000)
        self.instance: str | None = None  # the server instance last seen (accepted, ping, status)
        self._ctx = zmq.Context.instance()
        self.sock = self._ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve_keys:
            self.sock.curve_serverkey = curve_keys["server_key"]
            self.sock.curve_publickey = curve_keys["public_key"]
            self.sock.curve_secretkey = curve_keys["secret_key"]
        self.sock.connect(self.endpoint)
        self._prefix = f"{os.getpid()}-{id(self):x}-"

    def close(self) -> None:
        self.sock.close(0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- requests ---------------------------------------------------------------------------

    def send(self, verb: bytes, body: dict[str, Any], request_id: bytes | None = None) -> bytes:
        request_id = request_id or f"{self._prefix}{next(_ids)}".encode()
        self.sock.send_multipart([C.VERSION, verb, request_id, orjson.dumps(body)])
        return request_id

    def stream(self, verb: bytes, body: dict[str, Any], request_id: bytes | None = None) -> Stream:
        return Stream(self, self.send(verb, body, request_id))

    def complete(self, prompt: str, **params: Any) -> Stream:
        """`params`: the fields of SPEC.md 3.1, `model` among them (a served model's name;
        None or left out: the server's default)."""
        return self.stream(C.COMPLETE, {"prompt": prompt, **params})

    def chat(self, messages: list[dict[str, str]], **params: Any) -> Stream:
        """As complete(), with a conversation of {"role", "content"} messages."""
        return self.stream(C.CHAT, {"messages": messages, **params})

    def call(self, verb: bytes, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """A request whose only reply is its terminal frame."""
        stream = self.stream(verb, body or {})
        for _ in stream:
            pass
        return stream.done

    def cancel(self, target: bytes | Stream) -> bytes:
        """Ask the server to stop a request of this client; its stream then ends with a
        `cancelled` error (or with DONE if it finished first). Does not wait for the reply."""
        if isinstance(target, Stream):
            target = target.request_id
        return self.send(C.CANCEL, {"target": target.decode()})

    def tokenize(self, text: str, model: str | None = None) -> list[int]:
        """`text`'s token ids in `model`'s vocabulary (None: the server's default model)."""
        body: dict[str, Any] = {"text": text}
        if model is not None:
            body["model"] = model
        return self.call(C.TOKENIZE, body)["tokens"]

    def detokenize(self, tokens: list[int], model: str | None = None) -> str:
        """The text of token ids of `model`'s vocabulary (None: the server's default model)."""
        body: dict[str, Any] = {"tokens": list(tokens)}
        if model is not None:
            body["model"] = model
        return self.call(C.DETOKENIZE, body)["text"]

    def embed(
        self,
        inputs: str | list[str],
        model: str | None = None,
        normalize: bool = True,
        truncate: bool = False,
        encoding_format: str = "float",
    ) -> dict[str, Any]:
        """The embeddings of `inputs` (SPEC.md 3.15): the DONE body, its "embeddings" one
        vector per input (base64 strings of little-endian float32 with that encoding)."""
        body: dict[str, Any] = {"input": inputs}
        if model is not None:
            body["model"] = model
        if not normalize:
            body["normalize"] = False
        if truncate:
            body["truncate"] = True
        if encoding_format != "float":
            body["encoding_format"] = encoding_format
        return self.call(C.EMBED, body)

    def ping(self) -> dict[str, Any]:
        """The pong; its "instance" (also kept in `self.instance`) tells a restarted server."""
        return self.call(C.PING)

    def status(self) -> dict[str, Any]:
        return self.call(C.STATUS)

    # --- replies ----------------------------------------------------------------------------

    def receive_frames(self) -> list[bytes]:
        if not self.sock.poll(self.timeout_ms, zmq.POLLIN):
            raise TimeoutError(f"no reply from {self.endpoint} in {self.timeout_ms / 1000:g}s")
        return self.sock.recv_multipart()

    def _receive(self, request_id: bytes, instance: str | None = None) -> tuple[bytes, dict]:
        """The next reply to `request_id`, waiting at most the timeout for each frame of it."""
        deadline = time.monotonic() + self.timeout_ms / 1000
        while True:
            left_ms = max(0, round((deadline - time.monotonic()) * 1000))
            if not self.sock.poll(left_ms, zmq.POLLIN):
                raise ReplyTimeout(self.endpoint, request_id, self.timeout_ms, instance)
            frames = self.sock.recv_multipart()
            if len(frames) != 4 or frames[0] != C.VERSION:
                raise LlmsupError({"code": C.E_INTERNAL, "message": f"bad reply {frames[:2]!r}"})
            _, kind, rid, body = frames
            if rid == request_id:
                return kind, orjson.loads(body)
            # A reply to an earlier request this client abandoned: skip it.
