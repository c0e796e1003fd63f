"""Build (train) and cache the tiny student/teacher pair.

``build_tiny_pair()`` trains two Qwen3-architecture models on the synthetic task family of
:mod:`relay_agents.tiny.tasks` with one shared tokenizer and saves them as ordinary Hugging
Face model directories that vLLM serves:

* the **teacher** is trained on full reference solutions (it learns the hard products);
* the **student** is much smaller (about a ninth of the teacher's parameters; the paper's
  0.6B student is a thirteenth of its 8B teacher) and trained on the cold-start relay
  solutions: loss on its own text, the ``<call>N</call>`` commands and EOS, but not on the
  teacher's results;
* the **solo student** has the student's size and training budget (the default recipe: the
  student's size, steps, data and seed, without its chat-history examples) but is trained
  without relay, on the teacher's full solutions (it sees the hard results and never learns
  to call): the baseline a same-size model reaches alone ("student alone" in the paper's
  table). At this size and budget it learns the copying and the easy steps but few of the
  564 products.

The default recipe's build ships with the package (``relay_agents/tiny/weights/``, 2.7 MB,
written by ``python -m relay_agents.tiny ship``), so the demo and the tests start
without training. Other recipes (or a shipped copy that does not verify) are built and cached
in ``$RELAY_AGENTS_CACHE/tiny/<recipe-hash>/`` (default ``~/.cache/relay-agents/tiny/...``).
A directory, shipped or cached, is only used when its ``manifest.json`` (written last) matches
the recipe hash and every file's checksum; anything else is rebuilt in a temporary directory
inside the cache and renamed into place atomically. A rebuild
copies (checksum-verified) any model that another cached build trained with the same model
recipe, shared settings and tokenizer instead of retraining it (training is deterministic),
so adding a model to the recipe only trains the new one; ``force=True`` retrains all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import Progress, TaskID

from relay_agents.cache import (
    HF_MODEL_FILES,
    MANIFEST,
    cache_root,
    file_lock,
    sha256_file,
    verify_manifest,
    write_manifest,
)
from relay_agents.progress import step_bars

from . import tasks
from .tokenizer import (
    ENDOFTEXT,
    IM_END,
    TOKENIZER_VERSION,
    VOCAB_SIZE,
    render_chat,
    save_tokenizer,
    tokenizer_corpus,
    train_tokenizer,
)

log = logging.getLogger(__name__)

#: 2: denormals flushed to zero while training (see :func:`train_model`)
BUILD_VERSION = 2
#: the models of a build, in training order; each is a sub-directory of the build
MODEL_NAMES = ("teacher", "student", "solo")
MODEL_FILES = (*HF_MODEL_FILES, "special_tokens_map.json")
#: the default recipe's build, shipped as package data (a build directory with its manifest)
SHIPPED_DIR = Path(__file__).with_name("weights")


@dataclass(frozen=True)
class ModelRecipe:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    steps: int
    batch_size: int
    lr: float
    warmup: int
    n_train: int
    seed: int
    weight_decay: float = 0.01
    #: share of examples whose prompt starts with one earlier solved exchange (masked): the
    #: tiny models only see the positions they are trained on, so chat history needs this
    history_fraction: float = 0.0


@dataclass(frozen=True)
class Recipe:
    teacher: ModelRecipe
    student: ModelRecipe
    #: the solo student's recipe; ``None``: the student's (same size, steps, data, seed)
    solo: ModelRecipe | None = None
    tokenizer_problems: int = 2000
    vocab_size: int = VOCAB_SIZE
    max_position_embeddings: int = 512
    versions: tuple[int, int, int] = field(default=(tasks.TASK_VERSION, TOKENIZER_VERSION, BUILD_VERSION))
    task_params: tuple[Any, ...] = field(
        default=(tasks.A_RANGE, tasks.B_RANGE, tasks.N_EASY, tasks.EVAL_RESERVE)
    )

    @property
    def solo_recipe(self) -> ModelRecipe:
        return self.solo if self.solo is not None else self.student

    def digest(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


_STUDENT = ModelRecipe(
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=3,
    num_key_value_heads=1,
    head_dim=32,
    steps=1000,
    batch_size=32,
    lr=3e-3,
    warmup=30,
    n_train=16000,
    seed=2,
    history_fraction=0.25,
)

#: The capacity gap of the paper in miniature: the teacher (0.54M parameters) learns the 564
#: products in its budget (batch 64: more examples per second than a wider model, which is
#: what memorising a table needs); the student (0.06M, ~9x smaller) learns the easy steps and
#: the call syntax, which need little capacity, but a model of its size and budget trained on
#: full solutions gets few products right. ``head_dim`` stays 32: vLLM's CPU attention has no
#: smaller head size. The student sees an earlier exchange in a quarter of its examples (a
#: conversation with history, as in chat use, otherwise falls apart); the teacher does not (it
#: would no longer train in two minutes), nor does the solo student: it only answers the
#: table's single questions, and history would spend its little capacity so that it fails the
#: easy steps too, which blurs what the baseline shows.
DEFAULT_RECIPE = Recipe(
    teacher=ModelRecipe(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        steps=500,
        batch_size=64,
        lr=5e-3,
        warmup=50,
        n_train=16000,
        seed=1,
    ),
    student=_STUDENT,
    solo=dataclasses.replace(_STUDENT, history_fraction=0.0),
)


@dataclass(frozen=True)
class TinyPair:
    student_dir: Path
    teacher_dir: Path
    #: the solo student (student-sized, trained without relay); ``None`` for older callers
    solo_dir: Path | None = None

    @property
    def root(self) -> Path:
        return self.student_dir.parent

    @classmethod
    def in_build(cls, root: Path) -> TinyPair:
        """The pair of the build directory ``root``."""
        return cls(student_dir=root / "student", teacher_dir=root / "teacher", solo_dir=root / "solo")


# --------------------------------------------------------------------------- manifest


def _model_files() -> list[str]:
    return [f"{sub}/{name}" for sub in MODEL_NAMES for name in MODEL_FILES]


def _write_manifest(root: Path, digest: str, recipe: Recipe, stats: dict[str, Any]) -> None:
    write_manifest(
        root, {"recipe_hash": digest}, _model_files(), recipe=dataclasses.asdict(recipe), stats=stats
    )


def verify_pair(root: Path, digest: str) -> bool:
    """Whether ``root`` holds a complete build (teacher, student, solo) of recipe hash ``digest``."""
    return verify_manifest(root, {"recipe_hash": digest}, _model_files())


def read_stats(pair: TinyPair) -> dict[str, Any]:
    """The build statistics stored in the pair's manifest."""
    return json.loads((pair.root / MANIFEST).read_text()).get("stats", {})


# --------------------------------------------------------------------------- data


def _encode_segments(tok, prompt: str, segments: list[tasks.Segment], *, student: bool):
    """Token ids and labels; the prompt and ``prompt`` segments (text between turns, such as a
    tool's result) and, for the student, teacher segments are masked."""
    ids = list(tok.encode(prompt).ids)
    labels = [-100] * len(ids)
    for seg in segments:
        seg_ids = tok.encode(seg.text).ids
        ids += seg_ids
        masked = seg.role == "prompt" or (student and seg.role == "teacher")
        labels += [-100] * len(seg_ids) if masked else list(seg_ids)
    eos = tok.token_to_id(IM_END)
    ids.append(eos)
    labels.append(eos)
    return ids, labels


def build_examples(
    tok, problems: list[tasks.Problem], *, student: bool, history_fraction: float = 0.0, seed: int = 0
):
    """Token ids and labels of ``problems``; a ``history_fraction`` share (drawn with ``seed``)
    gets the previous problem and its teacher solution as an earlier exchange in the prompt."""
    count = _token_counter(tok)
    rng = random.Random(seed)
    out = []
    for i, p in enumerate(problems):
        messages = [{"role": "user", "content": p.user_message}]
        if i and rng.random() < history_fraction:
            prior = problems[i - 1]
            messages[:0] = [
                {"role": "user", "content": prior.user_message},
                {"role": "assistant", "content": tasks.teacher_solution(prior)},
            ]
        prompt = render_chat(messages)
        segs = tasks.student_segments(p, count) if student else tasks.teacher_segments(p)
        ids, labels = _encode_segments(tok, prompt, segs, student=student)
        full = prompt + "".join(s.text for s in segs) + IM_END
        if tok.encode(full).ids != ids:  # segment boundaries must not change tokenization
            raise AssertionError(f"segment tokenization differs for {p.question!r}")
        out.append((ids, labels))
    return out


def _token_counter(tok):
    return lambda text: len(tok.encode(text).ids)


# --------------------------------------------------------------------------- training


def _make_config(mr: ModelRecipe, tok, recipe: Recipe):
    from transformers import Qwen3Config

    eos = tok.token_to_id(IM_END)
    pad = tok.token_to_id(ENDOFTEXT)
    return Qwen3Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=mr.hidden_size,
        intermediate_size=mr.intermediate_size,
        num_hidden_layers=mr.num_hidden_layers,
        num_attention_heads=mr.num_attention_heads,
        num_key_value_heads=mr.num_key_value_heads,
        head_dim=mr.head_dim,
        max_position_embeddings=recipe.max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=pad,
        torch_dtype="float32",
        use_cache=True,
    )


def train_model(
    mr: ModelRecipe,
    tok,
    recipe: Recipe,
    examples,
    out_dir: Path,
    on_step: Callable[[], None] | None = None,
    *,
    save_tokenizer_files: Callable[[Any, Path], None] | None = None,
    threads: int = 2,
) -> dict[str, Any]:
    """Train one model on ``examples`` and save it (with the tokenizer) to ``out_dir``;
    ``on_step`` is called after every training step (a progress bar). ``save_tokenizer_files``
    writes a variant's tokenizer files (its chat template); default: the tiny world's.
    ``threads``: torch's threads (the result depends on it; one is faster on a loaded machine,
    where two threads wait on each other at every operation)."""
    import torch

    threads_before = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Once the loss nears zero, Adam's moments turn denormal and each step on the CPU takes
    # several times longer; flushing them to zero keeps the step time flat.
    torch.set_flush_denormal(True)
    try:
        return _train_model(mr, tok, recipe, examples, out_dir, on_step, save_tokenizer_files)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads_before)
        torch.use_deterministic_algorithms(deterministic)


def _train_model(
    mr: ModelRecipe,
    tok,
    recipe: Recipe,
    examples,
    out_dir: Path,
    on_step: Callable[[], None] | None,
    save_tokenizer_files: Callable[[Any, Path], None] | None,
) -> dict[str, Any]:
    import torch
    from transformers import GenerationConfig, Qwen3ForCausalLM
    from transformers.utils import logging as hf_logging

    torch.manual_seed(mr.seed)
    config = _make_config(mr, tok, recipe)
    model = Qwen3ForCausalLM(config)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": mr.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=mr.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < mr.warmup:
            return mr.lr * (step + 1) / mr.warmup
        frac = (step - mr.warmup) / max(1, mr.steps - mr.warmup)
        return mr.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    rng = random.Random(mr.seed)
    order: list[int] = []
    pad = config.pad_token_id
    t0 = time.monotonic()
    losses = []
    for step in range(mr.steps):
        if len(order) < mr.batch_size:
            perm = list(range(len(examples)))
            rng.shuffle(perm)
            order += perm
        batch = [examples[i] for i in order[: mr.batch_size]]
        del order[: mr.batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=input_ids, attention_mask=mask, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(out.loss.item())
        if on_step is not None:
            on_step()
        if step % 100 == 0 or step == mr.steps - 1:
            log.info("step %d loss %.4f (%.1fs)", step, out.loss.item(), time.monotonic() - t0)
    seconds = time.monotonic() - t0
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    # transformers draws a "Writing model shards" bar for a one-shard save: not our progress
    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()
    GenerationConfig(
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        do_sample=False,
    ).save_pretrained(out_dir)
    if save_tokenizer_files is not None:
        save_tokenizer_files(tok, out_dir)
    else:
        save_tokenizer(tok, out_dir, model_max_length=recipe.max_position_embeddings)
    tail = losses[-20:]
    return {
        "params": params,
        "train_seconds": round(seconds, 1),
        "final_loss": round(sum(tail) / len(tail), 4),
    }


# --------------------------------------------------------------------------- build


#: recipe fields besides a model's own that its weights depend on
_SHARED_FIELDS = ("tokenizer_problems", "vocab_size", "max_position_embeddings", "versions", "task_params")


def _reuse_model(base: Path, root: Path, name: str, mr: ModelRecipe, recipe: Recipe) -> dict[str, Any] | None:
    """Copy model ``name`` from another build in ``base`` that trained it identically.

    Training is deterministic, so a model with the same model recipe, shared recipe fields
    and tokenizer (``tokenizer.json`` checksum, already saved in ``root``) is the model this
    build would train: adding a model to the recipe does not retrain the others. Every
    copied file is checked against the other build's manifest. Returns its stats, or ``None``.
    """
    want = json.loads(json.dumps(dataclasses.asdict(recipe)))
    want_mr = json.loads(json.dumps(dataclasses.asdict(mr)))
    tok_sha = sha256_file(root / "tokenizer.json")
    for other in sorted(base.iterdir()):
        if other.name.startswith(".") or other == root or not other.is_dir():
            continue
        try:
            manifest = json.loads((other / MANIFEST).read_text())
            old = manifest["recipe"]
            old_mr = old.get(name)
            if name == "solo" and old_mr is None:  # the solo student defaults to the student's recipe
                old_mr = old.get("student")
            files = manifest["files"]
            if old_mr != want_mr or any(old.get(k) != want[k] for k in _SHARED_FIELDS):
                continue
            if files.get(f"{name}/tokenizer.json") != tok_sha:
                continue
            (root / name).mkdir(parents=True, exist_ok=True)
            for f in MODEL_FILES:
                shutil.copyfile(other / name / f, root / name / f)
            if all(sha256_file(root / name / f) == files[f"{name}/{f}"] for f in MODEL_FILES):
                stats = dict(manifest.get("stats", {}).get(name, {}))
                stats["reused_from"] = manifest["recipe_hash"]
                log.info("reusing %s from %s (same recipe and tokenizer)", name, other)
                return stats
        except (OSError, ValueError, KeyError, TypeError):
            pass
        shutil.rmtree(root / name, ignore_errors=True)
    return None


def build_tokenizer(recipe: Recipe):
    """The shared tokenizer of ``recipe``'s models (deterministic: seeded problems)."""
    problems = tasks.train_problems(recipe.tokenizer_problems, seed=10_000)
    return train_tokenizer(tokenizer_corpus(problems), vocab_size=recipe.vocab_size)


def _build_into(
    root: Path, recipe: Recipe, progress: Progress, *, reuse_from: Path | None = None
) -> dict[str, Any]:
    models = (
        ("teacher", recipe.teacher, False),
        ("student", recipe.student, True),
        ("solo", recipe.solo_recipe, False),  # the teacher's full solutions, student-sized
    )
    bars: dict[str, TaskID] = {
        name: progress.add_task(name, total=mr.steps, start=False) for name, mr, _ in models
    }
    tok = build_tokenizer(recipe)
    save_tokenizer(tok, root, model_max_length=recipe.max_position_embeddings)
    stats: dict[str, Any] = {}
    for name, mr, student in models:
        bar = bars[name]
        reused = _reuse_model(reuse_from, root, name, mr, recipe) if reuse_from is not None else None
        if reused is not None:
            stats[name] = reused
            progress.update(bar, completed=mr.steps, description=f"{name} (reused)")
            continue
        progress.update(bar, description=f"{name} (preparing {mr.n_train} examples)")
        examples = build_examples(
            tok,
            tasks.train_problems(mr.n_train, seed=mr.seed),
            student=student,
            history_fraction=mr.history_fraction,
            seed=mr.seed,
        )
        log.info("training %s on %d examples", name, len(examples))
        progress.update(bar, description=name)
        progress.start_task(bar)
        stats[name] = train_model(
            mr, tok, recipe, examples, root / name, on_step=lambda bar=bar: progress.advance(bar)
        )
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (root / f).unlink()
    return stats


def shipped_pair(recipe: Recipe = DEFAULT_RECIPE) -> TinyPair | None:
    """The pair shipped with the package, if it is a build of ``recipe`` whose files verify."""
    return TinyPair.in_build(SHIPPED_DIR) if verify_pair(SHIPPED_DIR, recipe.digest()) else None


def ship_pair(pair: TinyPair, dest: Path = SHIPPED_DIR) -> TinyPair:
    """Copy the verified build of ``pair`` (models and manifest) to ``dest``, replacing it:
    how a rebuilt default recipe becomes the package's weights."""
    digest = json.loads((pair.root / MANIFEST).read_text())["recipe_hash"]
    if not verify_pair(pair.root, digest):
        raise RuntimeError(f"{pair.root} is not a verified build")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        for rel in (*_model_files(), MANIFEST):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(pair.root / rel, tmp / rel)
        if not verify_pair(tmp, digest):
            raise RuntimeError(f"the copy of {pair.root} in {tmp} did not verify")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.chmod(0o755)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TinyPair.in_build(dest)


def build_tiny_pair(
    cache_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    *,
    recipe: Recipe = DEFAULT_RECIPE,
    use_shipped: bool = True,
    progress: Progress | None = None,
) -> TinyPair:
    """The tiny student/teacher pair and the solo student: the shipped build of ``recipe``
    (``use_shipped``), else the cached one, else trained here.

    ``cache_dir`` is the directory that holds one sub-directory per recipe hash (default
    ``cache_root() / "tiny"``). ``force`` trains even if a valid shipped or cached pair
    exists. ``progress``: where the training bars go (default: stderr, when a terminal).
    Safe against concurrent builders (a file lock) and interrupted builds.
    """
    if use_shipped and not force and (shipped := shipped_pair(recipe)) is not None:
        return shipped
    base = Path(cache_dir) if cache_dir is not None else cache_root() / "tiny"
    digest = recipe.digest()
    final = base / digest
    pair = TinyPair.in_build(final)
    if not force and verify_pair(final, digest):
        return pair
    with file_lock(base / f".{digest}.lock"):
        if not force and verify_pair(final, digest):
            return pair
        # leftovers of killed builds of this recipe (we hold the lock: none is running)
        for stale in base.glob(f".{digest}.build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest}.build-", dir=base))
        tmp.chmod(0o755)
        try:
            t0 = time.monotonic()
            with contextlib.nullcontext(progress) if progress is not None else step_bars() as shown:
                stats = _build_into(tmp, recipe, shown, reuse_from=None if force else base)
            stats["build_seconds"] = round(time.monotonic() - t0, 1)
            _write_manifest(tmp, digest, recipe, stats)
            if final.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".{digest}.old-", dir=base))
                final.rename(trash / "old")
                shutil.rmtree(trash, ignore_errors=True)
            tmp.rename(final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    if not verify_pair(final, digest):
        raise RuntimeError(f"tiny pair build in {final} did not verify")
    return pair
