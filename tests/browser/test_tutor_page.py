"""The tutor's page in headless Chromium, against the tutor on loopback backed by the
scripted upstreams: streaming, source colours, the live budget meter, persistence, several
conversations, and bad input or dead models handled in the page."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from relay_agents.testing import ScriptedServer
from tests.tutor_support import ANSWER, script_answer, serving_in_thread, tutor_app, tutor_relay_config

# Records, for each change of the streaming answer, its text length, the meter's spent tokens
# and the answer's state, so a test can tell that text arrived piece by piece and the meter
# moved before the answer was done.
RECORDER = """
window.__frames = [];
new MutationObserver(() => {
  const el = document.querySelector('.msg.assistant:last-of-type');
  if (!el) return;
  window.__frames.push({
    length: el.querySelector('.body').textContent.length,
    spent: document.getElementById('meter').dataset.spentTokens,
    state: el.dataset.state,
  });
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
"""


@contextlib.contextmanager
def tutor(
    scripted: ScriptedServer, tmp_path: Path, budget: dict[str, Any] | None = None, **options: Any
) -> Iterator[str]:
    config = tutor_relay_config(scripted, tmp_path, **(budget or {}))
    with serving_in_thread(tutor_app(config, tmp_path, **options)) as url:
        yield url


def open_page(page: Any, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")


def ask(page: Any, text: str) -> None:
    page.fill("#input", text)
    page.click("#send")
    page.wait_for_function("!document.getElementById('send').disabled")


def last_answer(page: Any) -> Any:
    return page.locator(".msg.assistant").last


def texts(page: Any, selector: str) -> list[str]:
    return page.eval_on_selector_all(selector, "els => els.map(e => e.textContent)")


def test_a_relayed_answer_streams_in_colour_moves_the_meter_and_survives_a_reload(
    page: Any, scripted: ScriptedServer, tmp_path: Path
) -> None:
    script_answer(scripted, "Q-page")
    scripted.configure(token_interval_s=0.03)
    with tutor(scripted, tmp_path) as url:
        open_page(page, url)
        assert page.get_attribute("#meter", "data-spent-tokens") == "0"
        assert page.inner_text(".legend").count("student") == 1 and "teacher" in page.inner_text(".legend")
        page.evaluate(RECORDER)
        ask(page, "Q-page: what is 12*34 + 1?")
        answer = last_answer(page)
        assert answer.get_attribute("data-state") == "done"
        frames = page.evaluate("window.__frames")
        streaming = [f for f in frames if f["state"] == "streaming"]
        assert len({f["length"] for f in streaming}) > 10  # the text arrived piece by piece
        assert any(f["spent"] == "3" for f in streaming)  # the meter moved while the answer streamed
        assert texts(page, ".msg.assistant .span.teacher") == [" 408"]
        assert "12*34 =" in "".join(texts(page, ".msg.assistant .span.student"))
        assert page.locator(".msg.assistant mjx-container").count() == 2  # $408 + 1 = 409$ and \boxed{409}
        assert page.get_attribute("#meter", "data-spent-tokens") == "3"
        assert "3 / 100 tokens · 1 call · $0.000" in page.inner_text("#meter-text")
        assert "teacher 3 tokens in 1 call" in answer.locator(".meta").inner_text()
        assert page.is_hidden("#budget-notice") and page.is_hidden("#error")
        page.screenshot(path=str(tmp_path / "relayed.png"))

        page.reload()
        page.wait_for_selector("body[data-ready=true]")
        page.wait_for_selector(".msg.assistant[data-state=done] mjx-container")
        assert texts(page, ".msg.user") == ["Q-page: what is 12*34 + 1?"]
        assert texts(page, ".msg.assistant .span.teacher") == [" 408"]
        assert page.get_attribute("#meter", "data-spent-tokens") == "3"
        assert "3 / 100 tokens" in page.inner_text("#meter-text")
        assert page.locator("#conversations li").count() == 1
        assert page.inner_text("#conversations li.active") == "Q-page: what is 12*34 + 1?"
    assert page.console_errors == []


def test_the_spent_budget_notice_appears_and_stays(
    page: Any, scripted: ScriptedServer, tmp_path: Path
) -> None:
    script_answer(scripted, "Q-first")
    scripted.script("student", "Q-second", ["Again 12*34 =<call>3</call>", " is too hard alone. \\boxed{0}"])
    with tutor(scripted, tmp_path, budget={"max_teacher_tokens": 3}) as url:
        open_page(page, url)
        assert page.is_hidden("#budget-notice")
        ask(page, "Q-first")
        assert page.is_visible("#budget-notice")
        assert "spent" in page.inner_text("#budget-notice")
        assert page.get_attribute("#meter", "data-exhausted") == "true"
        ask(page, "Q-second")
        answer = last_answer(page)
        assert answer.locator(".span.teacher").count() == 0
        assert "Teacher call declined" in answer.locator(".notice.budget").inner_text()
        assert "student went on alone" in answer.locator(".notice.budget").inner_text()
        page.reload()
        page.wait_for_selector("body[data-ready=true]")
        assert page.is_visible("#budget-notice")
        assert page.locator(".notice.budget").count() == 1
        assert "3 / 3 tokens" in page.inner_text("#meter-text")
    assert page.console_errors == []


def test_several_conversations_each_with_its_history_and_budget(
    page: Any, scripted: ScriptedServer, tmp_path: Path
) -> None:
    script_answer(scripted, "Q-alpha")
    script_answer(scripted, "Q-beta")
    with tutor(scripted, tmp_path) as url:
        open_page(page, url)
        ask(page, "Q-alpha")
        page.click("#new-conversation")
        page.wait_for_function("document.querySelectorAll('.msg').length === 0")
        assert page.get_attribute("#meter", "data-spent-tokens") == "0"  # a fresh budget
        assert page.locator("#suggestions button").count() == 1
        ask(page, "Q-beta")
        assert page.locator("#conversations li").count() == 2
        page.click("#conversations li:has-text('Q-alpha')")
        page.wait_for_selector(".msg.user:has-text('Q-alpha')")
        assert texts(page, ".msg.user") == ["Q-alpha"]
        assert page.get_attribute("#meter", "data-spent-tokens") == "3"
        # side by side: a second tab on the other conversation
        other = page.context.new_page()
        beta = page.eval_on_selector("#conversations li:has-text('Q-beta')", "e => e.dataset.id")
        other.goto(f"{url}/#c={beta}")
        other.wait_for_selector("body[data-ready=true]")
        assert texts(other, ".msg.user") == ["Q-beta"]
        assert texts(other, ".msg.assistant .span.teacher") == [" 408"]
    assert page.console_errors == []


def test_empty_and_too_long_messages_are_refused_and_nothing_is_lost(
    page: Any, scripted: ScriptedServer, tmp_path: Path
) -> None:
    with tutor(scripted, tmp_path, max_message_chars=50) as url:
        open_page(page, url)
        page.fill("#input", "   ")
        page.click("#send")
        assert page.inner_text("#error") == "The message is empty: type a question first."
        long = "Please explain " + "very " * 20 + "slowly."
        page.fill("#input", long)
        page.press("#input", "Enter")
        page.wait_for_selector("#error:has-text('the tutor takes at most 50')")
        assert page.input_value("#input") == long  # the text stays in the box
        assert page.locator(".msg").count() == 0
    assert [r for r in scripted.requests() if r["path"].startswith("/v1/")] == []


def test_a_dead_student_is_explained_and_the_question_can_be_retried(
    page: Any, scripted: ScriptedServer, tmp_path: Path
) -> None:
    script_answer(scripted, "Q-retry")
    scripted.faults("student", ["500", "500", "500"])
    with tutor(scripted, tmp_path) as url:
        open_page(page, url)
        ask(page, "Q-retry")
        assert page.inner_text("#error").startswith("The student model answered HTTP 500")
        assert "Your question is kept" in page.inner_text("#error")
        assert texts(page, ".msg.user .unanswered") == ["not answered yetRetry"]
        assert page.locator(".msg.assistant").count() == 0
        page.reload()
        page.wait_for_selector("body[data-ready=true]")
        assert page.locator(".msg.user", has_text="Q-retry").count() == 1  # the question survived
        page.click(".retry")
        page.wait_for_selector(".msg.assistant[data-state=done]")
        assert page.is_hidden("#error")
        assert page.locator(".unanswered").count() == 0
        assert texts(page, ".msg.assistant .span.teacher") == [" 408"]
        assert page.inner_text(".msg.assistant .body").startswith(ANSWER[:30])
    assert page.console_errors == []


def test_a_dead_teacher_leaves_a_notice_and_the_student_answers(
    page: Any, scripted: ScriptedServer, tmp_path: Path
) -> None:
    script_answer(scripted, "Q-lonely")
    scripted.faults("teacher", ["503", "503", "503"])
    with tutor(scripted, tmp_path) as url:
        open_page(page, url)
        ask(page, "Q-lonely")
        answer = last_answer(page)
        assert answer.get_attribute("data-state") == "done"
        assert answer.locator(".span.teacher").count() == 0
        notice = answer.locator(".notice.teacher").inner_text()
        assert notice.startswith("The teacher could not help") and "student went on alone" in notice
        assert page.get_attribute("#meter", "data-spent-tokens") == "0"
    assert page.console_errors == []
