"""The optional LLM re-check of answers the rules graded wrong.

A rule-based grader misses some right answers written in ways it does not parse (words, an
unboxed expression); a judge model reads the question, the gold answer and the response and
says whether they agree. Its verdicts are a column of their own: the rule-based accuracy is the
score, the re-checked one says how much of the gap may be the grader's.
"""

from __future__ import annotations

from dataclasses import dataclass

import openai

from relay_agents.core.config import Endpoint
from relay_agents.eval.data import Problem

#: What the judge is asked; it answers one word.
JUDGE_PROMPT = """A response to a problem was graded wrong by a rule-based checker. Decide whether \
its final answer is in fact the reference answer (the same value, written differently counts).

Problem:
{question}

Reference answer: {gold}

Response:
{response}

Reply with one word: YES if the response's final answer equals the reference answer, NO otherwise."""

#: Tokens the judge may write: one word, with room for a tokenizer that splits it.
JUDGE_MAX_TOKENS = 8


@dataclass(frozen=True)
class Recheck:
    """The judge's verdict: ``accepted`` is ``None`` when its reply is neither YES nor NO or the
    request failed (``error``)."""

    accepted: bool | None
    reply: str
    error: str | None = None


def verdict(reply: str) -> bool | None:
    """YES -> True, NO -> False (the first word, any case and punctuation), else None."""
    words = reply.strip().split()
    first = words[0].strip(".,:;!*\"'").upper() if words else ""
    return {"YES": True, "NO": False}.get(first)


class Judge:
    """Asks one chat endpoint (greedy, with the endpoint's seed) whether a failed answer is right."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._client = openai.AsyncOpenAI(
            base_url=endpoint.base_url,
            api_key=endpoint.api_key.get_secret_value(),
            timeout=endpoint.call_deadline_s,
            max_retries=endpoint.max_retries,
        )

    async def recheck(self, problem: Problem, response: str) -> Recheck:
        prompt = JUDGE_PROMPT.format(question=problem.prompt, gold=problem.answer, response=response)
        try:
            reply = await self._client.chat.completions.create(
                model=self.endpoint.model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=JUDGE_MAX_TOKENS,
                temperature=0.0 if self.endpoint.temperature is None else self.endpoint.temperature,
                seed=self.endpoint.seed,
                extra_body=self.endpoint.extra_body or None,
            )
        except openai.OpenAIError as exc:
            return Recheck(None, "", f"{type(exc).__name__}: {exc}")
        text = (reply.choices[0].message.content or "") if reply.choices else ""
        return Recheck(verdict(text), text)

    async def aclose(self) -> None:
        await self._client.close()
