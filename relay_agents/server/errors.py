"""OpenAI-style error objects, and how relay and upstream failures map onto HTTP statuses.

Clients branch on the status and on ``error.type`` / ``error.code``, as they do with
OpenAI. Upstream failures are 503 when trying again later may help (the model server is
unreachable, timed out, overloaded) and 502 when it will not (the model server refused the
request or answered garbage); the ``x-should-retry`` header tells the ``openai`` SDK which.
The message carries the endpoint client's: the role (student or teacher), its URL and a hint.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx2
import openai
from pydantic import ValidationError
from starlette.responses import Response

from relay_agents.budgets import BudgetExceeded
from relay_agents.clients import StreamError
from relay_agents.core.tools import ToolChoiceUnmet
from relay_agents.server.schemas import ErrorDetail, ErrorResponse

log = logging.getLogger("relay_agents.server")
#: Characters of an upstream failure passed on: the upstream's message, the URL and the hint fit.
MAX_DETAIL = 1000

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "insufficient_quota",
    499: "client_closed_request",
    502: "upstream_error",
    503: "upstream_unavailable",
}


class APIError(Exception):
    """An error answered to the client as an OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        retry: bool | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.retry = retry
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump()

    def response(self) -> Response:
        headers = dict(self.headers)
        if self.retry is not None:
            headers["x-should-retry"] = "true" if self.retry else "false"
        return Response(
            json.dumps(self.body()), status_code=self.status, headers=headers, media_type="application/json"
        )


def invalid_request(exc: ValidationError) -> APIError:
    """A pydantic validation error as a 400 naming the first bad field."""
    err = exc.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return APIError(
            400, f"We could not parse the JSON body of your request: {err['msg']}", code="json_invalid"
        )
    loc = [str(p) for p in err["loc"]]
    param = loc[0] if loc else None
    where = ".".join(loc)
    message = err["msg"].removeprefix("Value error, ")
    if not loc:
        message = f"the request body must be a JSON object: {message}"
    elif err["type"] == "missing":
        message = f"missing required parameter: {where}"
    elif where:
        message = f"invalid parameter {where}: {message}"
    return APIError(400, message, param=param, code="invalid_value")


def upstream_error(exc: BaseException) -> APIError | None:
    """An upstream (model server) failure as a 502 or 503; None when ``exc`` is not one."""
    if isinstance(exc, openai.APITimeoutError):
        return APIError(
            503, f"the upstream model server timed out: {_detail(exc)}", code="upstream_timeout", retry=True
        )
    if isinstance(exc, openai.APIConnectionError | httpx2.TransportError):
        return APIError(
            503,
            f"the upstream model server is unreachable: {_detail(exc)}",
            code="upstream_unreachable",
            retry=True,
        )
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        detail = _detail(exc)
        if status == 429 or status >= 500:
            return APIError(
                503,
                f"the upstream model server is unavailable (HTTP {status}): {detail}",
                code="upstream_unavailable",
                retry=True,
            )
        return APIError(
            502,
            f"the upstream model server refused the request (HTTP {status}): {detail}",
            code="upstream_rejected",
            retry=False,
        )
    if isinstance(exc, openai.APIError | httpx2.HTTPError | json.JSONDecodeError | StreamError):
        return APIError(
            502,
            f"the upstream model server sent an invalid response: {exc}",
            code="upstream_invalid_response",
            retry=False,
        )
    return None


def failure(exc: BaseException) -> APIError:
    """Any exception out of a relay run as the error the client gets (500 when unexpected)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, BudgetExceeded):
        return APIError(429, f"the teacher budget is spent: {exc}", code="insufficient_quota", retry=False)
    if isinstance(exc, ToolChoiceUnmet):  # the models answered, but not with the call required
        return APIError(502, f"the relay's answer missed tool_choice: {exc}", code="tool_choice_unmet")
    mapped = upstream_error(exc)
    if mapped is not None:
        return mapped
    log.error("relay failed", exc_info=exc)
    return APIError(
        500, f"internal server error ({type(exc).__name__}); see the server log", type="server_error"
    )


def _detail(exc: BaseException) -> str:
    """The failure as the endpoint client worded it (role, URL, upstream message, hint)."""
    return str(exc)[:MAX_DETAIL]
