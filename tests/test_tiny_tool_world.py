"""The tiny world's tool variant: its task, its chat template (the same text from the relay's
renderer, from Transformers as vLLM renders, and in training), its tokenizer and its shipped build."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from relay_agents.prompts import ChatTemplate
from relay_agents.tiny import tasks
from relay_agents.tiny import tool_world as tw
from relay_agents.tiny.tokenizer import IM_END, save_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The variant's tokenizer, trained from the recipe (seconds: once for the module)."""
    return tw.build_tokenizer(tw.default_recipe())


def test_a_problem_is_the_default_task_with_its_first_factor_as_a_product() -> None:
    problems = tw.eval_problems(50)
    assert len({p.question for p in problems}) == 50
    for p in problems:
        a, b = p.hard.lhs.split("*")
        assert p.x * p.y == int(a) and 2 <= p.x <= 9 and 2 <= p.y <= 9
        assert len(p.base.steps) in (2, 3)  # one hard step, one or two easy ones
        assert p.question.startswith(f"Compute {p.x}*{p.y}*{b} ")
        assert p.question.endswith(p.base.question.split(p.hard.lhs, 1)[1])
    held_out = {p.question for p in tw.eval_problems(tw.EVAL_RESERVE)}
    assert not held_out & {p.question for p in tw.train_problems(500)}


def test_the_conversations_the_models_are_trained_on() -> None:
    p = tw.ToolProblem(x=4, y=7, base=tasks.Problem("Compute 28*6 + 1 - 5.", 164, _steps()))
    prompt, segments = tw.student_text(p)
    assert prompt + "".join(s.text for s in segments) + IM_END == (
        "<|im_start|>system\n<tools>\nmultiply(a, b)\n</tools><|im_end|>\n"
        "<|im_start|>user\nCompute 4*7*6 + 1 - 5.\n" + tasks.INSTRUCTION + "<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "multiply", "arguments": {"a": 4, "b": 7}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n28\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n4*7 = 28\n28*6 =<call>4</call> 168\n168 + 1 = 169\n169 - 5 = 164\n"
        "\\boxed{164}<|im_end|>"
    )
    assert [s.role for s in segments] == ["student", "prompt", "student", "call", "teacher", "student"]
    # the teacher's template shows it the text turns only: the relay's teacher prompt after the tool
    # result is its training prompt
    prompt, segments = tw.teacher_text(p)
    assert prompt + "".join(s.text for s in segments) == (
        "<|im_start|>user\nCompute 4*7*6 + 1 - 5.\n" + tasks.INSTRUCTION + "<|im_end|>\n"
        "<|im_start|>assistant\n4*7 = 28\n28*6 = 168\n168 + 1 = 169\n169 - 5 = 164\n\\boxed{164}"
    )
    assert tw.render(tw.conversation(p), template=tw.TEACHER_CHAT_TEMPLATE) == prompt


def _steps() -> tuple[tasks.Step, ...]:
    return (
        tasks.Step("28*6", 168, hard=True),
        tasks.Step("168 + 1", 169, hard=False),
        tasks.Step("169 - 5", 164, hard=False),
    )


def test_the_relay_and_transformers_render_the_templates_alike(tmp_path: Path, tokenizer: Any) -> None:
    """vLLM's chat/completions renders with Transformers; the relay with its own Jinja: the same
    text, for arguments as the OpenAI wire sends them (a JSON string) and parsed (an object), with
    a system message, two tool calls and two results."""
    for name, template in tw.TEMPLATES.items():
        save_tokenizer(tokenizer, tmp_path / name, chat_template=template)
        _renders_alike(tmp_path / name)


def _renders_alike(directory: Path) -> None:
    hf = AutoTokenizer.from_pretrained(directory)
    ours = ChatTemplate.from_tokenizer_dir(directory)
    p = tw.eval_problems(1)[0]
    wire = tw.conversation(p)
    wire[1]["tool_calls"][0]["function"]["arguments"] = json.dumps(tw.tool_arguments(p))
    two = [
        {"role": "system", "content": "Be brief."},
        *wire[:2],
        {**wire[2]},
        {"role": "tool", "tool_call_id": "call_1", "content": "7"},
        {"role": "assistant", "content": "done"},
    ]
    for messages in (tw.conversation(p), wire, two, tw.conversation(p)[:1]):
        for tools in ([tw.MULTIPLY_TOOL], None):
            expected = hf.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=True
            )
            assert ours.render(messages, tools=tools) == expected
    if ours.template == tw.TOOL_CHAT_TEMPLATE:
        assert ours.render(tw.conversation(p), tools=[tw.MULTIPLY_TOOL]) == tw.render(tw.conversation(p))
        assert "Be brief.\n\n<tools>\n" in ours.render(two, tools=[tw.MULTIPLY_TOOL])


def test_the_tokenizer_writes_the_tool_markup_and_json_whole(tokenizer: Any) -> None:
    tok = tokenizer
    call = tw.tool_call_text(tw.eval_problems(1)[0])
    assert tok.decode(tok.encode(call).ids, skip_special_tokens=False) == call
    for tag in tw.TOOL_TOKENS:
        assert tok.encode(tag).ids == [tok.token_to_id(tag)]
    text = '{"name": "x", "arguments": {"q": "a \\"quoted\\" [list]", "n": [1, 2.5, null, true]}}'
    assert tok.decode(tok.encode(text).ids) == text
    assert len(tok.encode(" 168").ids) == 4  # the student's <call>4</call>: a space and three digits


def test_the_shipped_build_verifies_and_its_tokenizer_rebuilds_byte_for_byte(
    tmp_path: Path, tokenizer: Any
) -> None:
    assert tw.verify(tw.SHIPPED_DIR, tw.default_recipe()), (
        "the recipe changed: rebuild and ship it with `python -m relay_agents.tiny.tool_world ship`"
    )
    assert tw.shipped_dir() == tw.SHIPPED_DIR
    for name in tw.MODEL_NAMES:
        tw.tokenizer_files(tw.TEMPLATES[name])(tokenizer, tmp_path / name)
        for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            assert (tmp_path / name / file).read_bytes() == (tw.SHIPPED_DIR / name / file).read_bytes(), file
    total = sum(f.stat().st_size for f in tw.SHIPPED_DIR.rglob("*") if f.is_file())
    assert total < 5 * 2**20


def test_a_build_trains_both_models_side_by_side_and_seals_them(tmp_path: Path) -> None:
    """``ship``'s path with a two-step recipe: both processes train, the manifest verifies."""
    recipe = tw.default_recipe()
    short = dataclasses.replace(
        recipe,
        teacher=dataclasses.replace(recipe.teacher, steps=2, n_train=8, warmup=1),
        student=dataclasses.replace(recipe.student, steps=2, n_train=8, warmup=1),
        tokenizer_problems=50,
    )
    dest = tw.build(tmp_path / "weights", short)
    assert tw.verify(dest, short) and not tw.verify(dest, recipe)
    stats = json.loads((dest / "manifest.json").read_text())["stats"]
    assert set(stats) == {"teacher", "student", "build_seconds"}
    assert [p.name for p in tmp_path.iterdir()] == ["weights"]
