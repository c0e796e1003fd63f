"""Evaluate the tiny world: the paper's table in miniature.

* :func:`evaluate_servers` (the real measurement) runs the project's relay engine
  (:func:`relay_agents.arelay`) against vLLM servers, four settings on the same held-out
  problems:

  - ``student_alone``: the solo student (student-sized, trained without relay) answering
    alone (``policy="teacher_free"`` with the solo server in the student seat);
  - ``teacher_free``: the relay-trained student with calls blocked (vLLM ``bad_words``);
  - ``relay``: student + teacher, ``policy="command"``;
  - ``teacher_alone``: the teacher answering alone (in the student seat, ``teacher_free``).

* :func:`evaluate_pair` is a quick in-process check with transformers (greedy, no server)
  for development: teacher alone, solo student, student with calls banned and a lock-step
  batched relay.
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
    """In-process (transformers, greedy) held-out accuracies: teacher alone, solo student,
    student with calls banned, and the relay."""
    problems = tasks.eval_problems(n, seed=seed)
    student = _LM.load(pair.student_dir)
    teacher = _LM.load(pair.teacher_dir)
    res: dict[str, float] = {
        "n": n,
        "teacher_accuracy": solo_accuracy(teacher, problems),
        "student_accuracy_calls_banned": solo_accuracy(student, problems, ban_calls=True),
    }
    if pair.solo_dir is not None:
        res["solo_student_accuracy"] = solo_accuracy(_LM.load(pair.solo_dir), problems)
    res.update(relay_accuracy(student, teacher, problems))
    return res


#: the table's rows, in the paper's column order
SETTINGS = ("student_alone", "teacher_free", "relay", "teacher_alone")


def tiny_configs(servers, solo, *, temperature: float = 0.0, seed: int | None = None) -> dict[str, Any]:
    """The four settings' :class:`~relay_agents.core.config.RelayConfig` for the tiny servers.

    ``servers`` is a started :class:`~relay_agents.tiny.servers.TinyPairServers`, ``solo`` a
    started :class:`~relay_agents.serving.VLLMServer` for ``pair.solo_dir`` (``None``:
    no ``student_alone`` row). ``temperature``/``seed`` go on every endpoint (vLLM takes
    the seed per request, so sampled runs are reproducible).
    """
    from relay_agents.core.config import Endpoint

    sampling = {"temperature": temperature, "seed": seed}
    base = servers.relay_config()
    student = base.student.model_copy(update=sampling)
    teacher = base.teacher.model_copy(update=sampling)
    configs = {
        "teacher_free": servers.relay_config(student=student, teacher=teacher, policy="teacher_free"),
        "relay": servers.relay_config(student=student, teacher=teacher, policy="command"),
        # the teacher in the student seat, calls blocked: it writes the whole answer alone
        "teacher_alone": servers.relay_config(student=teacher, teacher=teacher, policy="teacher_free"),
    }
    if solo is not None:
        solo_ep = Endpoint(
            base_url=solo.base_url,
            model=solo.model,
            tokenizer_path=solo.model_dir,
            **sampling,
        )
        configs["student_alone"] = servers.relay_config(
            student=solo_ep, teacher=teacher, policy="teacher_free"
        )
    return {name: configs[name] for name in SETTINGS if name in configs}


async def evaluate_servers(
    servers,
    solo=None,
    *,
    n: int = 200,
    seed: int = tasks.DEFAULT_EVAL_SEED,
    temperature: float = 0.0,
    sampling_seed: int | None = None,
    concurrency: int = 32,
) -> dict[str, Any]:
    """The table through the relay engine: every setting on ``n`` held-out problems.

    Each row: ``accuracy`` (:func:`tasks.is_correct` on ``result.text``), ``student_tokens``
    and ``teacher_tokens`` (answer tokens written by the student seat and by the teacher;
    in ``teacher_alone`` the teacher sits in the student seat, so all its tokens count as
    teacher tokens), ``teacher_token_share`` (teacher tokens / all answer tokens),
    ``teacher_calls``, ``finish_reasons``, ``errors`` (failed answers count as wrong) and
    ``seconds``. All problems of a row run concurrently (at most ``concurrency`` at once).
    """
    import asyncio
    import time
    from collections import Counter

    from relay_agents.api import arelay

    problems = tasks.eval_problems(n, seed=seed)
    configs = tiny_configs(servers, solo, temperature=temperature, seed=sampling_seed)
    sem = asyncio.Semaphore(concurrency)

    async def one(config, p: tasks.Problem):
        async with sem:
            try:
                return await arelay(p.question, config)
            except Exception as e:  # an answer that failed is a wrong answer
                return e

    rows: dict[str, Any] = {}
    for name, config in configs.items():
        t0 = time.monotonic()
        results = await asyncio.gather(*(one(config, p) for p in problems))
        ok = [r for r in results if not isinstance(r, BaseException)]
        correct = sum(
            tasks.is_correct(r.text, p.gold)
            for r, p in zip(results, problems, strict=True)
            if not isinstance(r, BaseException)
        )
        s_tok = sum(r.usage.student_tokens for r in ok)
        t_tok = sum(r.usage.teacher_tokens for r in ok)
        if name == "teacher_alone":
            s_tok, t_tok = 0, s_tok + t_tok
        errors = [r for r in results if isinstance(r, BaseException)]
        rows[name] = {
            "accuracy": correct / n,
            "correct": correct,
            "student_tokens": s_tok,
            "teacher_tokens": t_tok,
            "teacher_token_share": t_tok / max(1, s_tok + t_tok),
            "teacher_calls": sum(r.usage.teacher_calls for r in ok),
            "finish_reasons": dict(Counter(str(r.finish_reason) for r in ok)),
            "errors": len(errors),
            "first_error": repr(errors[0])[:300] if errors else None,
            "seconds": round(time.monotonic() - t0, 1),
        }
    return {
        "n": n,
        "eval_seed": seed,
        "temperature": temperature,
        "sampling_seed": sampling_seed,
        "rows": rows,
    }
