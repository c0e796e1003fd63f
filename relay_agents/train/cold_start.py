"""Cold-start SFT data: student solutions with ``<call>N</call>`` commands in them, so that the
student learns the command's syntax before GRPO teaches it when to call.

Two methods:

* ``confidence``: the student answers under the confidence policy, so the teacher takes over
  at the first token the student is unsure of (its log-probability) and writes up to
  ``call_tokens`` tokens; each teacher span is spliced in after a command whose N is the span's
  length. The commands sit where this student hesitates, and N is what the teacher needed.
* ``random``: the student answers alone, and commands go in at random token positions with
  nothing spliced in: the N tokens after each command are the student's own text, standing where
  the teacher's would be (the published variant).

Rows are chat-format JSON Lines (``messages``: the prompt as the relay sends it, then the
answer) that TRL's ``SFTTrainer`` takes as is. ``teacher_spans`` holds the character ranges of
the assistant message that the teacher wrote (or, with ``random``, stands in for); with a
tokenizer, rows also get ``input_ids`` and ``labels`` in which the prompt and, by default, those
spans are masked (-100): the student is trained to call and to go on after the teacher's text,
not to imitate the teacher's steps, which it calls for because it cannot write them.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from relay_agents.api import arelay
from relay_agents.clients import client_for
from relay_agents.core.policies import ConfidencePolicy
from relay_agents.core.protocol import CALL_CLOSE, CALL_OPEN
from relay_agents.core.result import Span
from relay_agents.core.types import Request, TokenLogprob
from relay_agents.eval.data import Dataset, Problem
from relay_agents.eval.grading import Grader
from relay_agents.prompts import protocol_messages

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from relay_agents.core.config import RelayConfig

ColdStartMethod = Literal["confidence", "random"]
#: The label of a token the loss skips (PyTorch's cross-entropy ``ignore_index``).
IGNORED = -100


@dataclass(frozen=True)
class ColdStartOptions:
    method: ColdStartMethod = "confidence"
    threshold: float = 0.5
    """``confidence``: a token below this probability is one the student is unsure of."""
    call_tokens: int = 8
    """``confidence``: the most the teacher writes per call; ``random``: each command's N."""
    calls: int = 1
    """``random``: commands per answer (fewer when the answer has fewer tokens)."""
    only_correct: bool = True
    """Keep only answers the evaluation grader finds correct."""
    teacher_loss: bool = False
    """Whether the loss trains on the teacher's spans (with a tokenizer; default: masked)."""
    seed: int = 0
    concurrency: int = 8
    grade_workers: int = 2


def command(tokens: int) -> str:
    return f"{CALL_OPEN}{tokens}{CALL_CLOSE}"


def splice(spans: Sequence[Span]) -> tuple[str, list[tuple[int, int]]]:
    """The student's view of a relayed answer: each teacher span after a command asking for its
    tokens; and the teacher spans' character ranges in that text."""
    parts: list[str] = []
    ranges: list[tuple[int, int]] = []
    at = 0
    for span in spans:
        if span.source == "teacher":
            parts.append(command(span.tokens))
            at += len(parts[-1])
            ranges.append((at, at + len(span.text)))
        parts.append(span.text)
        at += len(span.text)
    return "".join(parts), ranges


def token_offsets(text: str, tokens: Sequence[str]) -> list[int]:
    """The character offset at which each token of ``text`` ends, as far as the tokens spell it
    (an EOS token the text leaves out, or undecodable bytes, end the list)."""
    offsets: list[int] = []
    at = 0
    for token in tokens:
        if not token or not text.startswith(token, at):
            break
        at += len(token)
        offsets.append(at)
    return offsets


def insert_calls(
    text: str, tokens: Sequence[str], rng: random.Random, *, calls: int, call_tokens: int
) -> tuple[str, list[tuple[int, int]]]:
    """``calls`` commands before random tokens of ``text`` (none before the first), each with N
    the tokens after it up to ``call_tokens`` or the next command; and those tokens' ranges."""
    ends = token_offsets(text, tokens)
    starts = [0, *ends[:-1]]
    choices = range(1, len(ends))
    positions = sorted(rng.sample(choices, min(calls, len(choices))))
    parts: list[str] = []
    ranges: list[tuple[int, int]] = []
    done = 0
    added = 0
    for i, position in enumerate(positions):
        following = positions[i + 1] if i + 1 < len(positions) else len(ends)
        n = min(call_tokens, following - position)
        begin, end = starts[position], ends[position + n - 1]
        parts += [text[done:begin], command(n)]
        added += len(parts[-1])
        ranges.append((begin + added, end + added))
        done = begin
    parts.append(text[done:])
    return "".join(parts), ranges


def sft_row(
    problem: Problem, messages: list[dict[str, Any]], answer: str, ranges: list[tuple[int, int]]
) -> dict[str, Any]:
    return {
        "id": problem.id,
        "messages": [*messages, {"role": "assistant", "content": answer}],
        "teacher_spans": [list(r) for r in ranges],
        "calls": len(ranges),
    }


def labelled(
    row: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, *, teacher_loss: bool = False
) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` of one row, rendered with the tokenizer's chat template: the
    prompt never counts for the loss, the teacher's spans only with ``teacher_loss``.

    A token is masked when it starts inside a masked range (the template's own text after the
    answer, its end-of-turn token included, counts: the student learns to stop)."""
    messages = row["messages"]
    answer = messages[-1]["content"]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    start = text.rfind(answer)
    if start < 0:
        raise ValueError(f"row {row.get('id')}: the chat template does not render the answer as written")
    masked = [(0, start)]
    if not teacher_loss:
        masked += [(start + a, start + b) for a, b in row["teacher_spans"]]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [
        IGNORED if any(a <= begin < b for a, b in masked) else token
        for token, (begin, _end) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return {"input_ids": ids, "labels": labels}


def sft_dataset(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, *, teacher_loss: bool = False
) -> datasets.Dataset:
    """A cold-start file as a tokenized ``datasets.Dataset`` (``input_ids``, ``labels``) that
    ``SFTTrainer`` trains on as is, with the masks of :func:`labelled`."""
    import datasets

    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return datasets.Dataset.from_list([labelled(r, tokenizer, teacher_loss=teacher_loss) for r in rows])


@dataclass(frozen=True)
class ColdStartSummary:
    written: int
    incorrect: int
    resumed: int
    failed: dict[str, str]


def skipped_path(out: Path) -> Path:
    """Where the ids of incorrect answers go (``SFT.skipped.jsonl``), so a rerun skips them too."""
    return out.with_name(f"{out.stem}.skipped{out.suffix or '.jsonl'}")


def _done(path: Path) -> set[str]:
    if not path.exists():
        return set()
    ids = set()
    for line in path.read_text().splitlines():
        try:
            ids.add(str(json.loads(line)["id"]))
        except (ValueError, KeyError, TypeError):
            continue  # an interrupted write leaves at most a torn last line
    return ids


async def _confidence(
    problem: Problem, config: RelayConfig, options: ColdStartOptions
) -> tuple[str, str, list[tuple[int, int]]]:
    policy = ConfidencePolicy(threshold=options.threshold, call_tokens=options.call_tokens)
    result = await arelay(problem.prompt, config.model_copy(update={"policy": policy}))
    answer, ranges = splice(result.spans)
    return result.text, answer, ranges


async def _random(
    problem: Problem, config: RelayConfig, messages: list[dict[str, Any]], options: ColdStartOptions
) -> tuple[str, str, list[tuple[int, int]]]:
    tokens: list[str] = []

    def keep(_index: int, token: TokenLogprob) -> bool:
        tokens.append(token.token)
        return False

    request = Request(
        messages=messages,
        answer="",
        max_tokens=config.max_answer_tokens,
        suppress_calls=True,
        enable_thinking=config.enable_thinking,
        logprobs=0,
    )
    generation = await client_for(config.student, "student").agenerate(request, watch=keep)
    rng = random.Random(f"{options.seed}:{problem.id}")
    answer, ranges = insert_calls(
        generation.text, tokens, rng, calls=options.calls, call_tokens=options.call_tokens
    )
    return generation.text, answer, ranges


async def run_cold_start(
    config: RelayConfig,
    dataset: Dataset,
    out: Path,
    options: ColdStartOptions,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    on_start: Callable[[int], None] = lambda _total: None,
    on_done: Callable[[], None] = lambda: None,
) -> ColdStartSummary:
    """Write one SFT row per problem into ``out`` as each finishes, incorrect answers' ids into
    :func:`skipped_path` (a rerun resumes both); with ``tokenizer`` (the student's), rows carry
    ``input_ids`` and ``labels`` too. ``on_done`` is called per answered problem."""
    skipped = skipped_path(out)
    done = _done(out) | _done(skipped)
    left = [p for p in dataset.problems if p.id not in done]
    on_start(len(left))
    out.parent.mkdir(parents=True, exist_ok=True)
    semaphore = asyncio.Semaphore(options.concurrency)
    failed: dict[str, str] = {}
    counts = {"written": 0, "incorrect": 0}
    with Grader(options.grade_workers) as grader, out.open("a") as file, skipped.open("a") as skipped_file:

        async def one(problem: Problem) -> None:
            messages = protocol_messages(
                [{"role": "user", "content": problem.prompt}],
                user_template=config.user_template,
                system_prompt=config.system_prompt,
            )
            async with semaphore:
                try:
                    if options.method == "confidence":
                        text, answer, ranges = await _confidence(problem, config, options)
                    else:
                        text, answer, ranges = await _random(problem, config, messages, options)
                except Exception as exc:  # a problem that errors is reported, and the run goes on
                    failed[problem.id] = f"{type(exc).__name__}: {exc}"
                    return
            correct = (await grader.grade(text, problem)).correct
            on_done()
            if options.only_correct and not correct:
                skipped_file.write(json.dumps({"id": problem.id, "correct": False, "text": text}) + "\n")
                skipped_file.flush()
                counts["incorrect"] += 1
                return
            row = sft_row(problem, messages, answer, ranges) | {"correct": correct, "method": options.method}
            if tokenizer is not None:
                row |= labelled(row, tokenizer, teacher_loss=options.teacher_loss)
            file.write(json.dumps(row) + "\n")
            file.flush()
            counts["written"] += 1

        await asyncio.gather(*(one(p) for p in left))
    return ColdStartSummary(counts["written"], counts["incorrect"], len(done), failed)
