"""Take the tutor page's screenshot in docs/tutor.md (docs/tutor.png): real relayed answers from the
tiny student/teacher pair on vLLM (CPU), in Debian's headless chromium driven by Playwright.

    .venv/bin/python scripts/tutor_screenshot.py [--out docs/tutor.png] [--questions 3]
        [--pair DIR --question Q --question Q ...]

The conversation budget is two hard steps (8 teacher tokens), so the third question shows
the spent-budget notice and the student answering alone.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from playwright.sync_api import sync_playwright

from relay_agents.core.config import Budget
from relay_agents.serving import VLLMServer
from relay_agents.testing.browser import launch_chromium
from relay_agents.tiny import tasks
from relay_agents.tiny.build import TinyPair
from relay_agents.tiny.servers import TinyPairServers, tiny_pair_servers
from relay_agents.tutor.service import TutorOptions
from relay_agents.tutor.web import create_tutor_app

ROOT = Path(__file__).resolve().parents[1]


def pair_servers(pair_dir: Path | None) -> TinyPairServers:
    """The tiny pair's servers (not started): a given build directory, else the current recipe's."""
    if pair_dir is None:
        return tiny_pair_servers()
    pair = TinyPair(student_dir=pair_dir / "student", teacher_dir=pair_dir / "teacher")
    student = VLLMServer(pair.student_dir, served_model_name="tiny-student", cpu_cores="0", max_model_len=512)
    teacher = VLLMServer(pair.teacher_dir, served_model_name="tiny-teacher", cpu_cores="1", max_model_len=512)
    return TinyPairServers(student, teacher, pair)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "tutor.png")
    parser.add_argument("--questions", type=int, default=3, help="how many held-out tiny problems to ask")
    parser.add_argument(
        "--question", action="append", default=None, help="ask this instead (repeat; for an older --pair)"
    )
    parser.add_argument("--chromium", default=None, help="default: RELAY_CHROMIUM, else chromium on PATH")
    parser.add_argument("--pair", type=Path, default=None, help="a built tiny pair (default: build or load)")
    args = parser.parse_args()
    questions = args.question or [p.question for p in tasks.eval_problems(args.questions)]
    work = Path(tempfile.mkdtemp(prefix="tutor-screenshot-"))
    with pair_servers(args.pair) as servers:
        config = servers.relay_config(
            budget=Budget(max_teacher_tokens=8), budget_store=str(work / "budgets.sqlite")
        )
        options = TutorOptions(system_prompt=None, history_messages=1, world="tiny relay world")
        app = create_tutor_app(config, options, work / "tutor.sqlite")
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/"
        try:
            with sync_playwright() as playwright:
                browser = launch_chromium(playwright, args.chromium)
                page = browser.new_page(viewport={"width": 1280, "height": 940})
                page.goto(url)
                page.wait_for_selector("body[data-ready=true]")
                for question in questions:
                    page.fill("#input", question)
                    page.click("#send")
                    page.wait_for_function("!document.getElementById('send').disabled", timeout=60_000)
                page.wait_for_timeout(500)  # MathJax's last formula
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out))
                print(page.inner_text("#messages"))
                print(page.inner_text("#meter-text"))
                browser.close()
        finally:
            server.should_exit = True
            thread.join(timeout=10)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
