"""OpenAI-style error replies: ApiError (status, message, param, code, headers), and the
one for each llmsup error code (SPEC.md 5), so a client sees the status and code OpenAI
would send, with Retry-After where retrying helps.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import orjson

from llmsup.protocol import constants as C
from llmsup.supervisor.gateway.upstream import E_LOST, E_NOT_AVAILABLE, E_UNREACHABLE

if TYPE_CHECKING:  # openai_api imports this module: a type only, no cycle at run time
    from llmsup.supervisor.gateway.openai_api import Job


class ApiError(Exception):
    """An OpenAI-style error response: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def model_not_found(name: str, served: list[str]) -> ApiError:
    """OpenAI's answer to a model it does not have: 404, code model_not_found."""
    shown = orjson.dumps(name[:100]).decode()
    return ApiError(
        404,
        f"the model {shown} does not exist; this server serves: "
        f"{', '.join(served) or 'none'} (GET /v1/models)",
        param="model",
        code="model_not_found",
    )


STATUS_OF = {
    C.E_BAD_REQUEST: 400,
    C.E_CONTEXT_OVERFLOW: 400,
    C.E_OVERLOADED: 503,
    C.E_SHUTTING_DOWN: 503,
    E_UNREACHABLE: 503,
    C.E_DEADLINE: 504,
    C.E_WORKER_LOST: 502,
    C.E_WORKER_FAILED: 502,
    E_LOST: 502,
    E_NOT_AVAILABLE: 501,
}
# OpenAI's own code where it has one that clients test for.
CODE_OF = {C.E_CONTEXT_OVERFLOW: "context_length_exceeded"}


def stopping_error() -> ApiError:
    """The gateway stops: 503 with Retry-After, which a balancer retries on another node."""
    return ApiError(
        503,
        "the gateway is stopping; retry later",
        code=C.E_SHUTTING_DOWN,
        headers={"Retry-After": "1"},
    )


def from_llmsup(body: dict[str, Any], job: Job | None, stopping: bool = False) -> ApiError:
    """The HTTP error for an llmsup error reply (SPEC.md 5)."""
    code = body.get("code", C.E_INTERNAL)
    message = body.get("message", "")
    if code == C.E_CANCELLED and stopping:  # the gateway cancelled it on its way out
        return stopping_error()
    status = STATUS_OF.get(code, 500)
    param = None
    headers: dict[str, str] = {}
    if code == C.E_BAD_REQUEST and body.get("field") == "model":
        # llmsup does not serve it (it restarted with other models since the gateway
        # looked): what OpenAI answers for an unknown model.
        return ApiError(404, message, param="model", code="model_not_found")
    if code == C.E_BAD_REQUEST and body.get("field"):
        param = body["field"]
        if job is not None:
            param = job.names.get(param, param)
    elif code == C.E_CONTEXT_OVERFLOW and job is not None:
        param = job.input_field
    retry_ms = body.get("retry_after_ms")
    if isinstance(retry_ms, int) and retry_ms >= 0:
        # Retry-After is whole seconds (rounded up); the openai SDKs prefer retry-after-ms.
        headers["Retry-After"] = str(max(1, math.ceil(retry_ms / 1000)))
        headers["retry-after-ms"] = str(retry_ms)
    elif code in (E_UNREACHABLE, C.E_SHUTTING_DOWN):
        headers["Retry-After"] = "1"  # on another node, behind a balancer
    if code == C.E_WORKER_FAILED:
        headers["x-should-retry"] = "false"  # SPEC.md 5: do not retry blindly
    return ApiError(status, message, param=param, code=CODE_OF.get(code, code), headers=headers)
