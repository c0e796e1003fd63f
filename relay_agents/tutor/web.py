"""The tutor's web app: one static chat page and a small JSON API it talks to.

Answers stream as newline-delimited JSON (one :mod:`~relay_agents.tutor.service` event a
line), read by the page with ``fetch``; no front-end build step. MathJax is served from the
``django-static-mathjax`` package (PyPI), so the page needs no network.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.staticfiles import StaticFiles

from relay_agents.budgets import close_budget_stores
from relay_agents.core.config import RelayConfig
from relay_agents.tutor.service import (
    ConversationBusy,
    Event,
    Tutor,
    TutorInputError,
    TutorOptions,
    UnknownConversation,
)

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 1_000_000


def mathjax_dir() -> Path | None:
    """MathJax's browser build (``es5/``) from the ``django-static-mathjax`` package, if installed."""
    spec = importlib.util.find_spec("mathjax")
    if spec is None or not spec.submodule_search_locations:
        return None
    es5 = Path(next(iter(spec.submodule_search_locations))) / "static" / "mathjax" / "es5"
    return es5 if (es5 / "tex-chtml.js").is_file() else None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _ndjson(events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield json.dumps(event).encode() + b"\n"
    except (TutorInputError, ConversationBusy, UnknownConversation) as exc:  # lost a race since the checks
        yield json.dumps({"type": "error", "message": str(exc)}).encode() + b"\n"


async def _json_body(request: Request) -> dict[str, Any]:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise TutorInputError(f"The request is larger than {MAX_BODY_BYTES} bytes.")
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise TutorInputError("The request is not JSON.") from None
    if not isinstance(data, dict):
        raise TutorInputError('The request must be a JSON object such as {"text": "..."}.')
    return data


def create_tutor_app(
    config: RelayConfig, options: TutorOptions | None = None, db_path: Path | None = None
) -> FastAPI:
    """The tutor page and its API for one relay config; conversations live in ``db_path``."""
    options = options or TutorOptions()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with Tutor.open(config, db_path, options) as tutor:
            app.state.tutor = tutor
            yield
        close_budget_stores()

    app = FastAPI(title="relay-agents tutor", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if (mathjax := mathjax_dir()) is not None:
        app.mount("/mathjax", StaticFiles(directory=mathjax), name="mathjax")

    def tutor_of(request: Request) -> Tutor:
        return request.app.state.tutor

    @app.exception_handler(TutorInputError)
    async def bad_input(request: Request, exc: TutorInputError) -> Response:
        return _error(400, str(exc))

    @app.exception_handler(UnknownConversation)
    async def unknown(request: Request, exc: UnknownConversation) -> Response:
        return _error(404, "This conversation does not exist (it may have been made with another database).")

    @app.exception_handler(ConversationBusy)
    async def busy(request: Request, exc: ConversationBusy) -> Response:
        return _error(409, str(exc))

    @app.get("/")
    async def page() -> Response:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/api/info")
    async def info(request: Request) -> Response:
        tutor = tutor_of(request)
        return JSONResponse(
            {
                "world": options.world,
                "student": tutor.config.student.model,
                "teacher": tutor.config.teacher.model,
                "suggestions": list(options.suggestions),
                "max_message_chars": options.max_message_chars,
                "mathjax": mathjax is not None,
            }
        )

    @app.get("/api/conversations")
    async def conversations(request: Request) -> Response:
        return JSONResponse({"conversations": await tutor_of(request).conversations()})

    @app.post("/api/conversations")
    async def new_conversation(request: Request) -> Response:
        return JSONResponse(await tutor_of(request).new_conversation(), status_code=201)

    @app.get("/api/conversations/{conversation_id}")
    async def conversation(request: Request, conversation_id: str) -> Response:
        return JSONResponse(await tutor_of(request).conversation(conversation_id))

    @app.post("/api/conversations/{conversation_id}/messages")
    async def ask(request: Request, conversation_id: str) -> Response:
        tutor = tutor_of(request)
        text = (await _json_body(request)).get("text")
        await tutor.prepare(conversation_id, text)
        return StreamingResponse(_ndjson(tutor.ask(conversation_id, text)), media_type="application/x-ndjson")

    @app.post("/api/conversations/{conversation_id}/retry")
    async def retry(request: Request, conversation_id: str) -> Response:
        tutor = tutor_of(request)
        await tutor.prepare(conversation_id, retry=True)
        return StreamingResponse(_ndjson(tutor.retry(conversation_id)), media_type="application/x-ndjson")

    return app
