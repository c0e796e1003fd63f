"""The tool variant of the tiny world: a student that calls a Python tool for one step and the
teacher for another, in the Hermes/Qwen tool-call format.

The task is the default one with the hard step's first factor given as a product of two
digits, and one or two easy steps::

    Compute 4*7*6 + 1 - 5.

The student answers in two turns, as an agent does:

1. a tool call and nothing else (the tiny student cannot multiply)::

       <tool_call>
       {"name": "multiply", "arguments": {"a": 4, "b": 7}}
       </tool_call>

2. after the tool's result (``28``), the solution: the tool's step, then the hard step relayed
   to the teacher with ``<call>4</call>`` (``28*6``: one of the 149 products the teacher
   learned), then the easy steps and the boxed answer::

       4*7 = 28
       28*6 =<call>4</call> 168
       168 + 1 = 169
       169 - 5 = 164
       \\boxed{164}

The student's chat template (:data:`TOOL_CHAT_TEMPLATE`, Jinja in ``tokenizer_config.json``)
renders the tools and the tool messages as Qwen2.5's does, more compactly: each tool is one
line with its name and its parameters' names (a tiny model learns one prompt, so the tool's
description stays out of it), an assistant's tool calls as ``<tool_call>`` blocks, tool
results as ``<tool_response>`` blocks in a user turn. vLLM's chat/completions (Transformers)
and the relay's own rendering give the same text.

The teacher is trained here too: the default teacher reads the product's operands at fixed
positions from the start of the prompt and fails on any other prompt (measured with
Transformers: 1 of 80 products right when the question names the factor as a product and the
answer starts with the tool's step, 5 of 100 with a system turn before an unchanged question). Its template
(:data:`TEACHER_CHAT_TEMPLATE`) shows it the text turns only, so its prompt when the student
calls it (after the tool's result) is the question and the answer so far, as in its
training. Both models share one tokenizer, trained on their texts (``<tool_call>`` and the
other tags are whole tokens, JSON punctuation gets merges, digits stay single tokens so
`` 168`` is 4 teacher tokens).

The build ships in ``tool_weights/`` (teacher, student, ``manifest.json`` with the recipe,
its hash and every file's SHA-256), made by ``python -m relay_agents.tiny.tool_world ship``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay_agents.cache import MANIFEST, verify_manifest, write_manifest

from . import tasks
from .build import MODEL_FILES
from .tokenizer import CALL_TOKENS, IM_END, TOKENIZER_VERSION

if TYPE_CHECKING:
    from .servers import TinyPairServers

VARIANT_VERSION = 1
SHIPPED_DIR = Path(__file__).with_name("tool_weights")
MODEL_NAMES = ("teacher", "student")
#: the Hermes/Qwen markup, whole ordinary tokens (as in Qwen's vocabulary)
TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<tools>", "</tools>")
ORDINARY_TOKENS = (*CALL_TOKENS, *TOOL_TOKENS)
_TRAIN_SEED_BASE = 4_000_037
_EVAL_SEED_BASE = 6_000_053
#: training never uses a question from the first this-many evaluation problems
EVAL_RESERVE = 2000

#: The tool the student knows, as an OpenAI ``tools`` entry.
MULTIPLY_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "multiply",
        "description": "Multiply two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}

#: ChatML with tools (Qwen2.5's layout, compact); every piece of text is a Jinja expression, so
#: the block-trimming settings of Transformers and of the relay cannot change it.
TOOL_CHAT_TEMPLATE = (
    "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
    "{% if tools %}"
    "{{ '<|im_start|>system\\n' }}{% if system %}{{ system + '\\n\\n' }}{% endif %}{{ '<tools>\\n' }}"
    "{% for tool in tools %}{% set f = tool['function'] if tool['function'] is defined else tool %}"
    "{% set params = f['parameters']['properties'] if f['parameters'] is defined "
    "and f['parameters']['properties'] is defined else {} %}"
    "{{ f['name'] + '(' + (params | list | join(', ')) + ')\\n' }}"
    "{% endfor %}"
    "{{ '</tools><|im_end|>\\n' }}"
    "{% elif system %}{{ '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\\n<tool_response>\\n' + (message['content'] or '') + '\\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}"
    "{{ '<|im_start|>assistant\\n' }}{% if message['content'] %}{{ message['content'] + '\\n' }}{% endif %}"
    "{% for call in message['tool_calls'] %}"
    "{% set f = call['function'] if call['function'] is defined else call %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_call>\\n{\"name\": \"' + f['name'] + '\", \"arguments\": ' }}"
    "{% if f['arguments'] is string %}{{ f['arguments'] }}{% else %}{{ f['arguments'] | tojson }}{% endif %}"
    "{{ '}\\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


#: The teacher's template: ChatML of the text turns only. The teacher continues arithmetic from
#: the question and the answer so far (which has the tool's result in its first line): it is
#: shown no tools and no tool turns, so its prompt is as short as the default teacher's.
TEACHER_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'tool' and message['content'] %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# --------------------------------------------------------------------------- task


@dataclass(frozen=True)
class ToolProblem:
    """A default-task problem whose hard step's first factor ``A`` is asked as ``x*y``."""

    x: int
    y: int
    base: tasks.Problem

    @property
    def hard(self) -> tasks.Step:
        return self.base.steps[0]

    @property
    def question(self) -> str:
        lhs = self.hard.lhs
        b = lhs.split("*")[1]
        return self.base.question.replace(f"Compute {lhs}", f"Compute {self.x}*{self.y}*{b}", 1)

    @property
    def user_message(self) -> str:
        return tasks.user_message(self.question)

    @property
    def answer(self) -> int:
        return self.base.answer

    @property
    def gold(self) -> str:
        return self.base.gold

    @property
    def factor(self) -> int:
        """``A``: the tool's result."""
        return self.x * self.y


#: the tool's factors: one digit each, so the hard step's ``A`` is one of 26 products and the
#: teacher's table has 149 entries (the default task's has 564): it trains in minutes
TOOL_FACTORS = (2, 9)
#: one or two easy steps (the default task has three or four): shorter conversations
N_EASY = (1, 2)


def make_problem(rng: random.Random) -> ToolProblem:
    """A default-task problem (with :data:`N_EASY` easy steps) whose ``A`` is ``x*y`` with
    both in :data:`TOOL_FACTORS` (drawn again otherwise); ``x`` is drawn among the choices."""
    low, high = TOOL_FACTORS
    while True:
        base = tasks.make_problem(rng, n_easy=N_EASY)
        a = int(base.steps[0].lhs.split("*")[0])
        factors = [x for x in range(low, high + 1) if a % x == 0 and low <= a // x <= high]
        if factors:
            x = rng.choice(factors)
            return ToolProblem(x=x, y=a // x, base=base)


def _stream(base: int, seed: int) -> Iterator[ToolProblem]:
    rng = random.Random(base * 1_000_003 + seed)
    while True:
        yield make_problem(rng)


def eval_problems(n: int = 200, seed: int = 0) -> list[ToolProblem]:
    """``n`` distinct held-out problems."""
    return tasks.distinct_problems(_stream(_EVAL_SEED_BASE, seed), n)


def train_problems(n: int, seed: int = 0) -> list[ToolProblem]:
    """``n`` training problems, none among the first :data:`EVAL_RESERVE` evaluation problems."""
    reserved = frozenset(p.question for p in eval_problems(EVAL_RESERVE))
    return tasks.problems_outside(_stream(_TRAIN_SEED_BASE, seed), n, reserved)


def tool_arguments(problem: ToolProblem) -> dict[str, int]:
    return {"a": problem.x, "b": problem.y}


def tool_call_text(problem: ToolProblem) -> str:
    """The student's first turn: the Hermes tool call."""
    arguments = json.dumps(tool_arguments(problem))
    return f'<tool_call>\n{{"name": "multiply", "arguments": {arguments}}}\n</tool_call>'


def conversation(problem: ToolProblem, *, call_id: str = "call_0") -> list[dict[str, Any]]:
    """The messages of the second turn's prompt: the question, the tool call, its result."""
    return [
        {"role": "user", "content": problem.user_message},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "multiply", "arguments": tool_arguments(problem)},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": str(problem.factor)},
    ]


def render(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    *,
    template: str = TOOL_CHAT_TEMPLATE,
) -> str:
    """``messages`` through ``template`` (default the student's, with :data:`MULTIPLY_TOOL`), with
    the generation prompt: the relay's renderer, so training sees what the relay sends."""
    from relay_agents.prompts import ChatTemplate

    return ChatTemplate(template).render(messages, tools=tools or [MULTIPLY_TOOL])


def student_text(
    problem: ToolProblem, count_tokens: Callable[[str], int] | None = None
) -> tuple[str, list[tasks.Segment]]:
    """The student's first prompt and the rest of its conversation as segments: the tool call (and
    EOS), the tool's result (``prompt``, masked), then the second turn: the tool's step and the
    cold-start solution with ``<call>N</call>`` before the hard result (``teacher``: the teacher's
    result). The final EOS is added by the encoder."""
    first = render(conversation(problem)[:1])
    second = render(conversation(problem))
    call = tool_call_text(problem) + IM_END
    if not second.startswith(first + call):
        raise AssertionError("the template does not render the tool call as the student writes it")
    head, *rest = tasks.student_segments(problem.base, count_tokens)
    return first, [
        tasks.Segment(call, "student"),
        tasks.Segment(second[len(first + call) :], "prompt"),
        tasks.Segment(_tool_step(problem) + head.text, head.role),
        *rest,
    ]


def teacher_text(problem: ToolProblem) -> tuple[str, list[tasks.Segment]]:
    """The teacher's prompt (the question, through :data:`TEACHER_CHAT_TEMPLATE`) and its full
    solution: the tool's step, the hard step, the easy steps."""
    prompt = render(conversation(problem)[:1], template=TEACHER_CHAT_TEMPLATE)
    return prompt, [tasks.Segment(_tool_step(problem) + tasks.teacher_solution(problem.base), "teacher")]


def _tool_step(problem: ToolProblem) -> str:
    return f"{problem.x}*{problem.y} = {problem.factor}\n"


# --------------------------------------------------------------------------- build


@dataclass(frozen=True)
class ToolRecipe:
    teacher: Any  # build.ModelRecipe (imported lazily: torch is only needed to build)
    student: Any
    tokenizer_problems: int = 2000
    vocab_size: int = 512
    #: torch threads per model (the two models train side by side)
    threads: int = 1
    task_params: tuple[Any, ...] = (TOOL_FACTORS, N_EASY, EVAL_RESERVE)
    versions: tuple[int, int, int] = (VARIANT_VERSION, tasks.TASK_VERSION, TOKENIZER_VERSION)

    def digest(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def default_recipe() -> ToolRecipe:
    """The shipped recipe: the default tiny world's model sizes and learning rates; the teacher
    sees 19,200 conversations (the default teacher 32,000: its table here has 149 products),
    the student 38,400, without chat-history examples (each problem is its own conversation)."""
    from .build import DEFAULT_RECIPE

    return ToolRecipe(
        teacher=dataclasses.replace(
            DEFAULT_RECIPE.teacher, steps=600, batch_size=32, warmup=30, n_train=8000
        ),
        student=dataclasses.replace(DEFAULT_RECIPE.student, steps=1200, n_train=16000, history_fraction=0.0),
    )


def _model_files() -> list[str]:
    return [f"{name}/{f}" for name in MODEL_NAMES for f in MODEL_FILES]


def verify(root: Path, recipe: ToolRecipe) -> bool:
    return verify_manifest(root, {"recipe_hash": recipe.digest()}, _model_files())


def build_tokenizer(recipe: ToolRecipe):
    """The shared tokenizer, trained on both models' texts (seeded problems)."""
    from .tokenizer import train_tokenizer

    texts = []
    for p in train_problems(recipe.tokenizer_problems, seed=10_000):
        for prompt, segs in (student_text(p), teacher_text(p)):
            texts.append(prompt + "".join(s.text for s in segs) + IM_END)
    return train_tokenizer(texts, vocab_size=recipe.vocab_size, ordinary_tokens=ORDINARY_TOKENS)


def build_examples(tok, problems: list[ToolProblem], *, student: bool):
    """Token ids and labels: the student's whole conversations (prompts, the tool's result and the
    teacher's results masked) or the teacher's solutions (the prompt masked)."""
    from .build import _encode_segments

    def count(text: str) -> int:
        return len(tok.encode(text).ids)

    out = []
    for p in problems:
        prompt, segs = student_text(p, count) if student else teacher_text(p)
        ids, labels = _encode_segments(tok, prompt, segs, student=student)
        if tok.encode(prompt + "".join(s.text for s in segs) + IM_END).ids != ids:
            raise AssertionError(f"segment tokenization differs for {p.question!r}")
        out.append((ids, labels))
    return out


def tokenizer_files(template: str) -> Callable[[Any, Path], None]:
    """What writes a model's tokenizer files: the shared tokenizer with the model's ``template``."""
    from .build import DEFAULT_RECIPE
    from .tokenizer import save_tokenizer

    def save(tok: Any, directory: Path) -> None:
        save_tokenizer(
            tok,
            directory,
            model_max_length=DEFAULT_RECIPE.max_position_embeddings,
            chat_template=template,
            ordinary_tokens=ORDINARY_TOKENS,
        )

    return save


#: each model's chat template
TEMPLATES = {"teacher": TEACHER_CHAT_TEMPLATE, "student": TOOL_CHAT_TEMPLATE}


def train_one(name: str, out_dir: Path, recipe: ToolRecipe | None = None) -> dict[str, Any]:
    """Train model ``name`` (``teacher`` or ``student``) of ``recipe`` into ``out_dir``; returns
    its training statistics. Each model trains in a process of its own (see :func:`build`)."""
    from .build import DEFAULT_RECIPE, train_model

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(message)s")
    recipe = recipe or default_recipe()
    mr = recipe.teacher if name == "teacher" else recipe.student
    tok = build_tokenizer(recipe)
    examples = build_examples(tok, train_problems(mr.n_train, seed=mr.seed), student=name == "student")
    # DEFAULT_RECIPE: the tiny world's shared settings (the 512-token context)
    return train_model(
        mr,
        tok,
        DEFAULT_RECIPE,
        examples,
        out_dir,
        save_tokenizer_files=tokenizer_files(TEMPLATES[name]),
        threads=recipe.threads,
    )


def seal(parts: Path, dest: Path, stats: dict[str, Any], recipe: ToolRecipe | None = None) -> Path:
    """Write the manifest of the models trained in ``parts`` and move them to ``dest`` (replaced)."""
    recipe = recipe or default_recipe()
    write_manifest(
        parts,
        {"recipe_hash": recipe.digest()},
        _model_files(),
        recipe=dataclasses.asdict(recipe),
        stats=stats,
    )
    if dest.exists():
        shutil.rmtree(dest)
    parts.chmod(0o755)
    parts.rename(dest)
    return dest


def build(dest: Path = SHIPPED_DIR, recipe: ToolRecipe | None = None) -> Path:
    """Train the teacher and the student of ``recipe`` side by side (a process each, on
    ``recipe.threads`` threads) and write them, sealed by the manifest, to ``dest`` (replaced)."""
    recipe = recipe or default_recipe()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        t0 = time.monotonic()
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=len(MODEL_NAMES), mp_context=spawn) as pool:
            futures = {name: pool.submit(train_one, name, tmp / name, recipe) for name in MODEL_NAMES}
            stats: dict[str, Any] = {name: future.result() for name, future in futures.items()}
        stats["build_seconds"] = round(time.monotonic() - t0, 1)
        return seal(tmp, dest, stats, recipe)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def shipped_dir() -> Path:
    """The shipped build (it must verify: shipping is how it is made)."""
    if not verify(SHIPPED_DIR, default_recipe()):
        raise RuntimeError(
            f"{SHIPPED_DIR} holds no verified build of the tool variant's recipe: "
            "run `python -m relay_agents.tiny.tool_world ship`"
        )
    return SHIPPED_DIR


def tool_world_servers(**kwargs: Any) -> TinyPairServers:
    """(Unstarted) vLLM servers for the shipped build: ``tiny-tool-student`` and
    ``tiny-tool-teacher`` (the keywords of :func:`~relay_agents.tiny.servers.tiny_pair_servers`)."""
    from .build import TinyPair
    from .servers import tiny_pair_servers

    root = shipped_dir()
    pair = TinyPair(student_dir=root / "student", teacher_dir=root / "teacher")
    return tiny_pair_servers(pair=pair, names=("tiny-tool-student", "tiny-tool-teacher"), **kwargs)


def read_stats() -> dict[str, Any]:
    return json.loads((SHIPPED_DIR / MANIFEST).read_text()).get("stats", {})


if __name__ == "__main__":
    if sys.argv[1:] != ["ship"]:
        sys.exit("usage: python -m relay_agents.tiny.tool_world ship")
    print(build())
