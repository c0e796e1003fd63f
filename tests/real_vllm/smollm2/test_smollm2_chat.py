"""SmolLM2-135M-Instruct served by real vLLM: natural text through the chat endpoint.

Plain ``openai`` SDK (``AsyncOpenAI``, ``max_retries=0``), temperature 0. The relay test
checks token accounting against the server's own Prometheus counters.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import urllib.request

import pytest
from openai import AsyncOpenAI

from relay_agents import Endpoint, RelayConfig, arelay
from relay_agents.models import smollm2
from relay_agents.models.smollm2 import MANIFEST, cache_key, gguf_path, read_stats, smollm2_dir, verify_dir

pytestmark = pytest.mark.real_vllm

QUESTION = "What is the capital of France?"
SEA = "Describe the sea in three sentences."


def client(server) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0, timeout=120)


def natural_english(text: str) -> bool:
    words = re.findall(r"[A-Za-z]+", text)
    return len(words) >= 3 and "<|" not in text and sum(c.isascii() for c in text) >= 0.95 * len(text)


def counter(server, name: str) -> float:
    """Sum of a Prometheus counter (all label sets) on the server."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.eE+-]+)$", re.MULTILINE)
    return sum(float(v) for v in pattern.findall(text))


# ------------------------------------------------------------------ the converted directory


def test_converted_directory(smollm2_model_dir):
    d = smollm2_model_dir
    assert verify_dir(d, cache_key(gguf_path()))
    config = json.loads((d / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    tok_config = json.loads((d / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == smollm2.CHAT_TEMPLATE
    assert tok_config["eos_token"] == "<|im_end|>"
    assert read_stats(d)["params"] == 134_515_008


def test_cached_copy_is_used_and_corruption_detected(smollm2_model_dir, tmp_path):
    key = cache_key(gguf_path())
    copy = tmp_path / key
    copy.mkdir()
    for f in smollm2_model_dir.iterdir():
        (copy / f.name).symlink_to(f) if f.name == "model.safetensors" else shutil.copy(f, copy / f.name)
    assert smollm2_dir(cache_dir=tmp_path) == copy  # valid: no conversion
    (copy / "tokenizer_config.json").write_text("{}")
    assert not verify_dir(copy, key)
    (copy / MANIFEST).write_text("not json")
    assert not verify_dir(copy, key)


# ------------------------------------------------------------------ chat endpoint


async def test_chat_answers_in_natural_english(smollm2_server):
    c = client(smollm2_server)
    r = await c.chat.completions.create(
        model=smollm2_server.model,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=64,
    )
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert "Paris" in text and natural_english(text), text


async def test_continue_final_message(smollm2_server):
    c = client(smollm2_server)
    kw = {"model": smollm2_server.model, "temperature": 0}
    full = await c.chat.completions.create(**kw, messages=[{"role": "user", "content": SEA}], max_tokens=24)
    answer = full.choices[0].message.content
    assert natural_english(answer), answer
    partial = " ".join(answer.split(" ")[:3])  # cut at a word boundary: same tokens
    n = 8
    r = await c.chat.completions.create(
        **kw,
        messages=[{"role": "user", "content": SEA}, {"role": "assistant", "content": partial}],
        max_tokens=n,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    cont = r.choices[0].message.content
    assert r.usage.completion_tokens == n and r.choices[0].finish_reason == "length"
    assert cont and not cont.lstrip().startswith(partial), (partial, cont)
    assert "<|im_start|>" not in cont and "assistant" not in cont.split()[:1]
    # greedy decoding continues the partial exactly as the uninterrupted answer went on
    assert answer.startswith(partial + cont), (partial, cont, answer)


async def test_stream_equals_non_stream(smollm2_server):
    c = client(smollm2_server)
    kw = {
        "model": smollm2_server.model,
        "messages": [{"role": "user", "content": SEA}],
        "temperature": 0,
        "max_tokens": 32,
    }
    full = await c.chat.completions.create(**kw)
    chunks, usage = [], None
    stream = await c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(chunks) == full.choices[0].message.content
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens


# ------------------------------------------------------------------ relay API


async def test_relay_with_smollm2_as_student_and_teacher(smollm2_server):
    ep = Endpoint(
        base_url=smollm2_server.base_url, model=smollm2_server.model, api="chat", temperature=0, max_retries=0
    )
    config = RelayConfig(student=ep, teacher=ep, max_answer_tokens=64)
    gen = "vllm:generation_tokens_total"
    before = counter(smollm2_server, gen)
    result = await arelay(QUESTION, config)
    assert result.text.strip() and natural_english(result.text), result.text
    assert result.finish_reason in {"stop", "length"}
    assert result.usage.teacher_calls == 0 and result.usage.teacher_tokens == 0
    assert {s.source for s in result.spans} == {"student"}
    assert 0 < result.usage.student_tokens <= 64
    assert result.message.usage_metadata["output_tokens"] == result.usage.student_tokens
    # the server's own count (its counters are updated just after the stream ends)
    for _ in range(40):
        served = counter(smollm2_server, gen) - before
        if served >= result.usage.student_tokens:
            break
        await asyncio.sleep(0.05)
    assert served == result.usage.student_tokens
