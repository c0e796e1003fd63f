"""The OpenAI wire format as vLLM speaks it: requests read and checked (in vLLM's order, with
its messages), errors, and the non-streamed completion and chat completion bodies."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from .generation import Generation
from .logprobs import logprobs_payload
from .tokens import CALL_TOKEN, Vocabulary, render_chat, tokenize

_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 429: "RateLimitError"}


class BadRequest(Exception):
    """A request the server answers with 400 and this message (``param``: the field at fault)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def error_response(message: str, status: int = 400, param: str | None = None) -> JSONResponse:
    etype = _ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "APIError")
    body = {"error": {"message": message, "type": etype, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


async def read_json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise BadRequest(f"invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def detokenize(vocabulary: Vocabulary, ids: list[Any]) -> str:
    try:
        return vocabulary.detokenize(ids)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def batch_prompts(body: dict[str, Any]) -> list[Any] | None:
    """The prompts of a completions request with a list of two or more prompts (strings or
    token-id lists), else None."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 1 and not all(isinstance(t, int) for t in prompt):
        return prompt
    return None


def render_prompt(body: dict[str, Any], *, chat: bool, vocabulary: Vocabulary) -> str:
    """The prompt text: a completion's ``prompt`` (a string, one string, or token ids) or the
    chat ``messages`` rendered with the chat template."""
    if not chat:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return detokenize(vocabulary, prompt)
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string (or one string, or a list of ids)")
        return prompt
    add_gen = body.get("add_generation_prompt", True)
    cont = body.get("continue_final_message", False)
    if add_gen and cont:
        raise BadRequest("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
    try:
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise BadRequest("tools must be a list")
        return render_chat(
            body.get("messages"), add_generation_prompt=add_gen, continue_final_message=cont, tools=tools
        )
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def _stop_list(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise BadRequest("stop must be a string or a list of strings")


def _int_field(body: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool):
                raise BadRequest(f"{name} must be an integer")
            return value
    return None


def _calls_banned(body: dict[str, Any], vocabulary: Vocabulary) -> bool:
    """Whether ``bad_words`` or a ``logit_bias`` of -100 bans the ``<call>`` token."""
    banned = {str(w).strip() for w in body.get("bad_words") or []}
    for key, bias in (body.get("logit_bias") or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            raise BadRequest(f"logit_bias key {key!r} is not a token id") from None
        token = detokenize(vocabulary, [token_id])
        if bias <= -100:
            banned.add(token)
    return CALL_TOKEN in banned


def _requested_logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """Top-k asked for (completions ``logprobs: k``; chat ``logprobs: true, top_logprobs: k``)."""
    if chat:
        if not body.get("logprobs"):
            return None
        k = body.get("top_logprobs") or 0
    else:
        k = body.get("logprobs")
        if k is None or k is False:
            return None
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= 20:
        raise BadRequest("logprobs / top_logprobs must be an integer between 0 and 20")
    return k


@dataclass
class GenerationRequest:
    """A checked ``/v1/completions`` or ``/v1/chat/completions`` request."""

    chat: bool
    model: str
    stream: bool
    include_usage: bool
    continuous_usage: bool  # each chunk carries its choice's usage so far
    stop: list[str]
    include_stop_str_in_output: bool
    prompt_tokens: int
    max_tokens: int
    suppress_calls: bool
    top_logprobs: int | None  # None: no log-probabilities asked for
    id: str
    created: int
    n: int = 1  # replies asked for (the API's ``n``): each the next scripted answer
    return_token_ids: bool = False  # vLLM's: each choice's prompt and reply token ids


def parse_generation(
    body: dict[str, Any], *, chat: bool, model: str, prompt: str, vocabulary: Vocabulary, max_model_len: int
) -> GenerationRequest:
    """Check the generation fields of ``body`` as vLLM does; :class:`BadRequest` if one is bad."""
    n = _int_field(body, "n")
    n = 1 if n is None else n
    stream = bool(body.get("stream", False))
    if n < 1:
        raise BadRequest("n must be at least 1")
    if n > 1 and stream:
        raise BadRequest("n > 1 is answered whole on the scripted server, not streamed")
    if body.get("stream_options") is not None and not stream:
        raise BadRequest("Stream options can only be defined when `stream=True`.")
    stop = _stop_list(body.get("stop"))
    prompt_tokens = len(tokenize(prompt))
    max_tokens = fit_max_tokens(body, chat=chat, prompt_tokens=prompt_tokens, max_model_len=max_model_len)
    suppress_calls = _calls_banned(body, vocabulary)
    return GenerationRequest(
        chat=chat,
        model=model,
        stream=stream,
        include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
        continuous_usage=bool((body.get("stream_options") or {}).get("continuous_usage_stats")),
        stop=stop,
        include_stop_str_in_output=bool(body.get("include_stop_str_in_output", False)),
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        suppress_calls=suppress_calls,
        top_logprobs=_requested_logprobs(body, chat),
        id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        created=int(time.time()),
        n=n,
        return_token_ids=not chat and body.get("return_token_ids") is True,
    )


# ---- the context window, checked as vLLM 0.32 checks it ---------------------------------------


def fit_max_tokens(body: dict[str, Any], *, chat: bool, prompt_tokens: int, max_model_len: int) -> int:
    """The tokens a request may generate, or :class:`BadRequest` with vLLM's message: a
    max_tokens above the context, a prompt longer than the context, then the max_tokens left
    once it is cut to the room after the prompt (vLLM cuts it silently) when that is below 1."""
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    param = next((n for n in names if body.get(n) is not None), "max_tokens")
    max_tokens = _int_field(body, *names)
    if max_tokens is not None and max_tokens > max_model_len:
        raise _invalid(
            f"{param}={max_tokens} cannot be greater than max_model_len={max_model_len}. "
            "Please request fewer output tokens.",
            param,
            max_tokens,
        )
    if prompt_tokens > max_model_len:
        raise _invalid(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
            f"contains {prompt_tokens} input tokens, which exceeds this limit even without any "
            "output tokens. Please reduce the length of the input prompt.",
            "input_tokens",
            prompt_tokens,
        )
    room = max_model_len - prompt_tokens
    fitted = room if max_tokens is None else min(max_tokens, room)
    if fitted < 1:
        raise _invalid(f"max_tokens must be at least 1, got {fitted}.", "max_tokens", fitted)
    return fitted


def _invalid(message: str, parameter: str, value: int) -> BadRequest:
    """vLLM's ``VLLMValidationError``: the message names the field and the value."""
    return BadRequest(f"{message} (parameter={parameter}, value={value})", param=parameter)


def usage(req: GenerationRequest, gen: Generation) -> dict[str, Any]:
    return {
        "prompt_tokens": req.prompt_tokens,
        "total_tokens": req.prompt_tokens + gen.completion_tokens,
        "completion_tokens": gen.completion_tokens,
        "prompt_tokens_details": None,
    }


def completion_body(req: GenerationRequest, gen: Generation, probs: list[float | None]) -> dict[str, Any]:
    """The non-streamed ``text_completion`` or ``chat.completion`` object."""
    choice: dict[str, Any] = {"index": 0}
    if req.chat:
        choice["message"] = {"role": "assistant", "content": gen.text, "tool_calls": []}
    else:
        choice["text"] = gen.text
    logprobs = None
    if req.top_logprobs is not None:
        logprobs = logprobs_payload(gen.logprob_tokens(), probs, req.top_logprobs, chat=req.chat)
    choice |= {"logprobs": logprobs, "finish_reason": gen.finish_reason, "stop_reason": gen.stop_reason}
    return {
        "id": req.id,
        "object": "chat.completion" if req.chat else "text_completion",
        "created": req.created,
        "model": req.model,
        "choices": [choice],
        "usage": usage(req, gen),
    }


def sampled_body(bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``n`` replies of one request in one body: each body's choice in order, indexed, and
    the usage summed over them (vLLM counts the prompt once)."""
    choices = [{**body["choices"][0], "index": i} for i, body in enumerate(bodies)]
    completion = sum(body["usage"]["completion_tokens"] for body in bodies)
    prompt = bodies[0]["usage"]["prompt_tokens"]
    usage = {**bodies[0]["usage"], "completion_tokens": completion, "total_tokens": prompt + completion}
    return {**bodies[0], "choices": choices, "usage": usage}
