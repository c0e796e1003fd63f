"""Relay rollouts for GRPO: the policy writes, the teacher fills each granted call.

The student is the trainer's own model (transformers ``generate``, one batch over every open
rollout per turn, stopped at ``</call>``), so the rollouts always come from the current
policy without a weight sync, or, with TRL's vLLM server (``use_vllm``, ``vllm_mode="server"``),
that server, which TRL syncs with the policy before each batch of rollouts. The teacher is any
OpenAI-compatible endpoint reached through relay-agents'
:class:`~relay_agents.clients.EndpointClient` (the relay protocol's teacher view, ``max_tokens``
= the grant). Each call is granted by :func:`relay_agents.core.grants.grant`
against the call cap, the answer's tokens left and the answer's teacher budget, as in a served
relay. The teacher's text is re-encoded with the student's tokenizer and spliced into the
completion with ``env_mask`` 0, which TRL's GRPOTrainer multiplies into the loss mask: the
teacher's tokens are in the sequence the policy conditions on but carry no policy loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from relay_agents.clients import EndpointClient
from relay_agents.core.config import Budget, Endpoint
from relay_agents.core.grants import BudgetLimit, CallQuote, Spend, TokenCap, grant
from relay_agents.core.protocol import CALL_CLOSE, parse_call, teacher_view
from relay_agents.core.types import Message, Request


class RolloutSettings(BaseModel):
    """How one relay rollout runs (the published protocol's limits by default)."""

    max_turns: int = Field(default=5, ge=1, description="Student turns per answer.")
    max_answer_tokens: int = Field(default=8192, ge=1, description="Student and teacher tokens.")
    max_call_tokens: int | None = Field(default=None, ge=1, description="Cap on one call's grant.")
    budget: Budget = Field(default_factory=Budget, description="Teacher spend allowed per answer.")
    teacher_workers: int = Field(default=8, ge=1, description="Teacher requests in flight at once.")


@dataclass
class Rollout:
    """One answer being relayed: its token ids, who wrote each, and what the teacher spent."""

    messages: list[Message]
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    #: 1 where the student wrote the token, 0 where the teacher did
    env_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    requested: list[int] = field(default_factory=list)
    spend: Spend = field(default_factory=Spend)
    done: bool = False

    @property
    def teacher_tokens(self) -> int:
        return len(self.env_mask) - sum(self.env_mask)


class RelayRollouts:
    """TRL's ``rollout_func``: relays one answer per prompt (the trainer repeats each prompt
    ``num_generations`` times) and returns the ids, the student's log-probabilities, ``env_mask``
    and the relay's figures (``called``, ``teacher_tokens``) that the reward
    functions receive as keyword arguments."""

    def __init__(self, teacher: Endpoint, settings: RolloutSettings | None = None) -> None:
        self.teacher = EndpointClient(teacher, "teacher")
        self.settings = settings or RolloutSettings()

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, Any]:
        args = trainer.args
        student: Any = trainer.model
        if args.use_vllm:
            if args.vllm_mode != "server":
                raise ValueError(
                    "relay rollouts sample the student from TRL's vLLM server: vllm_mode='server'"
                )
            student = trainer.vllm_generation.vllm_client
        rollouts = self.run(
            student,
            trainer.processing_class,
            [_messages(p) for p in prompts],
            temperature=args.temperature,
            top_p=args.top_p,
            max_tokens=min(args.max_completion_length, self.settings.max_answer_tokens),
        )
        return {
            "prompt_ids": [r.prompt_ids for r in rollouts],
            "completion_ids": [r.completion_ids for r in rollouts],
            "logprobs": [r.logprobs for r in rollouts],
            "env_mask": [r.env_mask for r in rollouts],
            "called": [bool(r.requested) for r in rollouts],
            "teacher_tokens": [r.teacher_tokens for r in rollouts],
        }

    def run(
        self,
        student: Any,
        tokenizer: Any,
        conversations: Sequence[list[Message]],
        *,
        temperature: float | None,
        top_p: float = 1.0,
        max_tokens: int | None = None,
    ) -> list[Rollout]:
        """Relay every conversation to its end; ``student`` is the model or TRL's vLLM client;
        ``temperature`` ``None`` or 0 decodes greedily."""
        cap = min(max_tokens or self.settings.max_answer_tokens, self.settings.max_answer_tokens)
        rollouts = [
            Rollout(list(m), tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True))
            for m in conversations
        ]
        rollouts = [_as_ids(r) for r in rollouts]
        with ThreadPoolExecutor(self.settings.teacher_workers) as pool:
            for turn in range(self.settings.max_turns):
                open_ = [r for r in rollouts if not r.done and len(r.completion_ids) < cap]
                if not open_:
                    break
                self._student_turn(student, tokenizer, open_, temperature, top_p, cap)
                last_turn = turn == self.settings.max_turns - 1
                calls = [r for r in open_ if not r.done and not last_turn]
                list(pool.map(lambda r: self._teacher_call(tokenizer, r, cap), calls))
        return rollouts

    def _student_turn(
        self,
        student: Any,
        tokenizer: Any,
        rollouts: list[Rollout],
        temperature: float | None,
        top_p: float,
        cap: int,
    ) -> None:
        """One student turn of every rollout in ``rollouts``: ``student`` is the model, or TRL's
        vLLM server client (``trl vllm-serve``, which TRL keeps in sync with the policy)."""
        contexts = [r.prompt_ids + r.completion_ids for r in rollouts]
        room = max(1, cap - min(len(r.completion_ids) for r in rollouts))
        if hasattr(student, "update_named_params"):  # TRL's VLLMClient
            outputs = _vllm_generate(student, contexts, temperature, top_p, room)
        else:
            outputs = _local_generate(student, tokenizer, contexts, temperature, top_p, room)
        eos = tokenizer.eos_token_id
        for r, (new, logps) in zip(rollouts, outputs, strict=True):
            kept, text = [], ""
            for tok in new[: cap - len(r.completion_ids)]:
                kept.append(tok)
                if tok == eos:
                    r.done = True
                    break
                text += tokenizer.decode([tok])
                if text.endswith(CALL_CLOSE):
                    break
            r.completion_ids += kept
            r.env_mask += [1] * len(kept)
            r.logprobs += [float(x) for x in logps[: len(kept)]]
            r.text += tokenizer.decode(kept, skip_special_tokens=True)
            if not r.done and parse_call(r.text) is None:
                r.done = True  # ended by the length cap without a call

    def _teacher_call(self, tokenizer: Any, r: Rollout, cap: int) -> None:
        command = parse_call(r.text)
        if command is None:
            return
        if command.tokens is None or command.tokens == 0:
            return  # malformed or N=0: no teacher; the student resumes
        r.requested.append(command.tokens)
        limits = [
            TokenCap("max_call_tokens", self.settings.max_call_tokens),
            TokenCap("answer_tokens", cap - len(r.completion_ids)),
            BudgetLimit("turn", self.settings.budget, r.spend),
        ]
        granted = grant(CallQuote(command.tokens), limits).granted
        if granted <= 0:
            return
        request = Request(messages=r.messages, answer=teacher_view(r.text), max_tokens=granted)
        gen = self.teacher.generate(request)
        ids = tokenizer.encode(gen.text, add_special_tokens=False)[:granted]
        r.spend = r.spend + Spend(gen.completion_tokens, 1)
        r.completion_ids += ids
        r.env_mask += [0] * len(ids)
        r.logprobs += [0.0] * len(ids)
        r.text += tokenizer.decode(ids)
        if gen.finish_reason == "stop":  # the teacher ended the answer (EOS) before N tokens
            r.done = True


def _local_generate(
    model: Any, tokenizer: Any, contexts: list[list[int]], temperature: float | None, top_p: float, room: int
) -> list[tuple[list[int], list[float]]]:
    """New tokens and their log-probabilities from transformers ``generate`` (left-padded batch)."""
    import torch

    pad = tokenizer.pad_token_id
    width = max(map(len, contexts))
    ids = torch.full((len(contexts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(contexts), width), dtype=torch.long)
    for i, ctx in enumerate(contexts):  # left padding: every row ends where generation starts
        ids[i, width - len(ctx) :] = torch.tensor(ctx)
        attention[i, width - len(ctx) :] = 1
    sample = bool(temperature)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=attention.to(model.device),
            max_new_tokens=room,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=0 if sample else None,
            stop_strings=[CALL_CLOSE],
            tokenizer=tokenizer,
            pad_token_id=pad,
            output_scores=True,
            return_dict_in_generate=True,
        )
        scores = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    if was_training:
        model.train()
    return [(out.sequences[i, width:].tolist(), scores[i].tolist()) for i in range(len(contexts))]


def _vllm_generate(
    client: Any, contexts: list[list[int]], temperature: float | None, top_p: float, room: int
) -> list[tuple[list[int], list[float]]]:
    """New tokens and their log-probabilities from TRL's vLLM server client (token-id prompts,
    stopped after ``</call>``)."""
    out = client.generate(
        prompts=contexts,
        temperature=temperature or 0.0,
        top_p=top_p,
        max_tokens=room,
        logprobs=0,
        generation_kwargs={"stop": [CALL_CLOSE], "include_stop_str_in_output": True},
    )
    return [
        (ids, [token[0] for token in logps])
        for ids, logps in zip(out["completion_ids"], out["logprobs"], strict=True)
    ]


def _messages(prompt: Any) -> list[Message]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def _as_ids(r: Rollout) -> Rollout:
    """``apply_chat_template(tokenize=True)`` returns a list or, in transformers 5, a mapping."""
    ids: Any = r.prompt_ids
    if not isinstance(ids, list):
        ids = ids["input_ids"]
    r.prompt_ids = list(ids)
    return r
