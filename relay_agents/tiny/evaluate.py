"""Evaluate the tiny pair in-process with transformers (greedy decoding, no server).

``evaluate_pair(pair, n=200)`` reports held-out accuracy of the teacher alone, the
student alone (``<call>`` banned) and the relay (student + teacher following the relay
protocol: the teacher continues the stripped teacher view for exactly N tokens), and
the share of answer tokens the teacher wrote.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import tasks
from .tokenizer import render_chat

_CALL_RE = re.compile(r"<call>(.*?)</call>", re.DOTALL)


@dataclass
class _LM:
    model: Any
    tok: Any

    @classmethod
    def load(cls, directory: Path) -> _LM:
        import torch
        from transformers import AutoTokenizer, Qwen3ForCausalLM

        torch.set_num_threads(2)
        tok = AutoTokenizer.from_pretrained(directory)
        tok.padding_side = "left"
        model = Qwen3ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        return cls(model, tok)

    def generate(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int | list[int],
        stop: str | None = None,
        ban: list[str] = (),
        batch_size: int = 100,
    ) -> list[tuple[str, int]]:
        """Greedy completions of raw text prompts: (text, completion tokens)."""
        import torch

        limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
        eos = self.tok.convert_tokens_to_ids("<|im_end|>")
        stop_id = self.tok.convert_tokens_to_ids(stop) if stop else None
        bad = [[self.tok.convert_tokens_to_ids(b)] for b in ban] or None
        out: list[tuple[str, int]] = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            lim = limits[i : i + batch_size]
            enc = self.tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                gen = self.model.generate(
                    **enc,
                    max_new_tokens=max(lim),
                    do_sample=False,
                    eos_token_id=[eos] + ([stop_id] if stop_id is not None else []),
                    pad_token_id=self.tok.pad_token_id,
                    bad_words_ids=bad,
                )
            for row, n in zip(gen[:, enc["input_ids"].shape[1] :].tolist(), lim, strict=True):
                ids = []
                for t in row[:n]:
                    if t == self.tok.pad_token_id:
                        break
                    ids.append(t)
                    if t in (eos, stop_id):
                        break
                n_tok = len(ids)
                if ids and ids[-1] == eos:
                    ids = ids[:-1]
                out.append((self.tok.decode(ids), n_tok))
        return out


def _prompt(p: tasks.Problem) -> str:
    return render_chat([{"role": "user", "content": p.user_message}])


def solo_accuracy(lm: _LM, problems: list[tasks.Problem], *, ban_calls: bool = False) -> float:
    texts = lm.generate(
        [_prompt(p) for p in problems], max_new_tokens=200, ban=["<call>"] if ban_calls else []
    )
    return sum(tasks.is_correct(t, p.gold) for (t, _), p in zip(texts, problems, strict=True)) / len(problems)


def relay_accuracy(
    student: _LM, teacher: _LM, problems: list[tasks.Problem], *, max_turns: int = 8
) -> dict[str, float]:
    """Run the relay protocol in lock-step batches; returns accuracy and teacher share."""
    views = [""] * len(problems)
    student_tokens = [0] * len(problems)
    teacher_tokens = [0] * len(problems)
    active = list(range(len(problems)))
    for _ in range(max_turns):
        if not active:
            break
        outs = student.generate(
            [_prompt(problems[i]) + views[i] for i in active], max_new_tokens=200, stop="</call>"
        )
        calls = []
        for i, (text, n) in zip(active, outs, strict=True):
            views[i] += text
            student_tokens[i] += n
            m = list(_CALL_RE.finditer(text))
            if text.endswith("</call>") and m:
                with contextlib.suppress(ValueError):
                    calls.append((i, max(1, min(64, int(m[-1].group(1).strip())))))
        if not calls:
            break
        t_prompts = [_prompt(problems[i]) + _CALL_RE.sub(" ", views[i]).strip() for i, _ in calls]
        t_outs = teacher.generate(t_prompts, max_new_tokens=[n for _, n in calls])
        for (i, _), (text, n) in zip(calls, t_outs, strict=True):
            views[i] += text
            teacher_tokens[i] += n
        active = [i for i, _ in calls]
    correct = sum(
        tasks.is_correct(_CALL_RE.sub(" ", v), p.gold) for v, p in zip(views, problems, strict=True)
    )
    return {
        "relay_accuracy": correct / len(problems),
        "teacher_token_share": sum(teacher_tokens) / max(1, sum(teacher_tokens) + sum(student_tokens)),
    }


def evaluate_pair(pair, n: int = 200, seed: int = tasks.DEFAULT_EVAL_SEED) -> dict[str, float]:
    """Held-out accuracies of teacher alone, student alone (calls banned) and the relay."""
    problems = tasks.eval_problems(n, seed=seed)
    student = _LM.load(pair.student_dir)
    teacher = _LM.load(pair.teacher_dir)
    res = {
        "n": n,
        "teacher_accuracy": solo_accuracy(teacher, problems),
        "student_accuracy_calls_banned": solo_accuracy(student, problems, ban_calls=True),
    }
    res.update(relay_accuracy(student, teacher, problems))
    return res


async def evaluate_servers(
    student_url: str,
    teacher_url: str,
    *,
    student_model: str = "tiny-student",
    teacher_model: str = "tiny-teacher",
    n: int = 200,
    seed: int = tasks.DEFAULT_EVAL_SEED,
    concurrency: int = 32,
) -> dict[str, float]:
    """The same measurements through two OpenAI-compatible (vLLM) servers.

    Student alone uses vLLM's ``bad_words=["<call>"]``; the relay uses ``stop=["</call>"]``
    with ``include_stop_str_in_output`` and raw completions for the teacher.
    """
    import asyncio

    from openai import AsyncOpenAI

    problems = tasks.eval_problems(n, seed=seed)
    student = AsyncOpenAI(base_url=student_url, api_key="EMPTY", max_retries=0)
    teacher = AsyncOpenAI(base_url=teacher_url, api_key="EMPTY", max_retries=0)
    sem = asyncio.Semaphore(concurrency)

    async def complete(client, model: str, prompt: str, **kw: Any):
        async with sem:
            return await client.completions.create(model=model, prompt=prompt, temperature=0, **kw)

    async def solo(client, model: str, p: tasks.Problem, **kw: Any) -> bool:
        r = await complete(client, model, _prompt(p), max_tokens=200, **kw)
        return tasks.is_correct(r.choices[0].text, p.gold)

    async def relay(p: tasks.Problem) -> tuple[bool, int, int]:
        view, s_tok, t_tok = "", 0, 0
        for _ in range(8):
            r = await complete(
                student,
                student_model,
                _prompt(p) + view,
                max_tokens=200,
                stop=["</call>"],
                extra_body={"include_stop_str_in_output": True},
            )
            text = r.choices[0].text
            view += text
            s_tok += r.usage.completion_tokens
            calls = list(_CALL_RE.finditer(text))
            if not (text.endswith("</call>") and calls):
                break
            try:
                want = max(1, min(64, int(calls[-1].group(1).strip())))
            except ValueError:
                break
            t_view = _CALL_RE.sub(" ", view).strip()
            r = await complete(teacher, teacher_model, _prompt(p) + t_view, max_tokens=want)
            view += r.choices[0].text
            t_tok += r.usage.completion_tokens
        return tasks.is_correct(_CALL_RE.sub(" ", view), p.gold), s_tok, t_tok

    t_acc = await asyncio.gather(*(solo(teacher, teacher_model, p) for p in problems))
    s_acc = await asyncio.gather(
        *(solo(student, student_model, p, extra_body={"bad_words": ["<call>"]}) for p in problems)
    )
    relays = await asyncio.gather(*(relay(p) for p in problems))
    s_total = sum(r[1] for r in relays)
    t_total = sum(r[2] for r in relays)
    return {
        "n": n,
        "teacher_accuracy": sum(t_acc) / n,
        "student_accuracy_calls_banned": sum(s_acc) / n,
        "relay_accuracy": sum(r[0] for r in relays) / n,
        "teacher_token_share": t_total / max(1, s_total + t_total),
    }
