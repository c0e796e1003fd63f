"""Run the scripted server: ``python -m relay_agents.testing.scripted --host 127.0.0.1 --port P``."""

from __future__ import annotations

import argparse
import contextlib

import uvicorn

from .app import create_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A scripted, vLLM-compatible OpenAI server for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run(
            create_app(),
            host=args.host,
            port=args.port,
            http="h11",
            lifespan="off",
            log_level=args.log_level,
            access_log=False,
            backlog=2048,
            timeout_graceful_shutdown=1,
        )


if __name__ == "__main__":
    main()
