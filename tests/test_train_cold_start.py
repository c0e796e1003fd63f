"""Cold-start SFT data: splicing and command insertion on their own, both methods against the
scripted server (real HTTP), the loss masks, and TRL's SFTTrainer taking the rows as they are."""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
from pathlib import Path

import pytest

from relay_agents.core.result import Span
from relay_agents.eval import load_jsonl
from relay_agents.testing import ScriptedServer, tokenize
from relay_agents.train.cold_start import (
    IGNORED,
    ColdStartOptions,
    insert_calls,
    labelled,
    run_cold_start,
    sft_dataset,
    skipped_path,
    splice,
    token_offsets,
)
from tests.conftest import ROOT, relay_config
from tests.test_entry_points import CLI, relay_env

STUDENT_DIR = ROOT / "relay_agents" / "tiny" / "weights" / "student"
COMMAND = re.compile(r"<call>\d+</call>")


def test_splice_puts_a_command_asking_for_each_teacher_span_before_it() -> None:
    spans = [
        Span(source="student", text="So 47*6 =", tokens=5),
        Span(source="teacher", text=" 282", tokens=3),
        Span(source="student", text=", +8", tokens=3),
        Span(source="teacher", text=" = 290", tokens=4),
    ]
    text, ranges = splice(spans)
    assert text == "So 47*6 =<call>3</call> 282, +8<call>4</call> = 290"
    assert [text[a:b] for a, b in ranges] == [" 282", " = 290"]


def test_a_teacher_that_writes_first_gets_a_command_at_the_start() -> None:
    text, ranges = splice(
        [Span(source="teacher", text="42", tokens=1), Span(source="student", text=".", tokens=1)]
    )
    assert (text, ranges) == ("<call>1</call>42.", [(14, 16)])


def test_token_offsets_stop_where_the_tokens_no_longer_spell_the_text() -> None:
    assert token_offsets("ab cd", ["ab", " c", "d", "<|im_end|>"]) == [2, 4, 5]
    assert token_offsets("ab", ["a", "", "b"]) == [1]


def test_random_commands_go_before_random_tokens_and_cover_the_n_tokens_after_them() -> None:
    text = "So 47*6 = 282, then 282 + 8 = 290. \\boxed{290}"
    tokens = tokenize(text)
    spliced, ranges = insert_calls(text, tokens, random.Random(3), calls=3, call_tokens=4)
    assert COMMAND.sub("", spliced) == text
    commands = list(COMMAND.finditer(spliced))
    assert len(commands) == len(ranges) == 3
    for found, (a, b) in zip(commands, ranges, strict=True):
        n = int(found.group()[6:-7])
        assert a == found.end() and 1 <= n <= 4
        assert len(tokenize(spliced[a:b])) == n  # exactly the N tokens after the command
    again, _ = insert_calls(text, tokens, random.Random(3), calls=3, call_tokens=4)
    assert again == spliced  # the same seed puts them in the same places
    assert not spliced.startswith("<call>")


def test_more_commands_than_tokens_put_one_before_each_token_but_the_first() -> None:
    spliced, ranges = insert_calls("abc", ["a", "b", "c"], random.Random(0), calls=9, call_tokens=8)
    assert spliced == "a<call>1</call>b<call>1</call>c" and len(ranges) == 2


# ---------------------------------------------------------------- the masks, with a real tokenizer


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(STUDENT_DIR)


ROW = {
    "id": "x",
    "messages": [
        {"role": "user", "content": "What is 12*34?"},
        {"role": "assistant", "content": "12*34 =<call>3</call> 408 so \\boxed{408}"},
    ],
    "teacher_spans": [[21, 25]],
}


def test_labels_skip_the_prompt_and_by_default_the_teacher(tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert ROW["messages"][1]["content"][21:25] == " 408"
    out = labelled(ROW, tokenizer)
    trained = tokenizer.decode(
        [t for t, label in zip(out["input_ids"], out["labels"], strict=True) if label != IGNORED]
    )
    assert trained == "12*34 =<call>3</call> so \\boxed{408}<|im_end|>\n"
    with_teacher = labelled(ROW, tokenizer, teacher_loss=True)
    trained = tokenizer.decode(
        [
            t
            for t, label in zip(with_teacher["input_ids"], with_teacher["labels"], strict=True)
            if label != IGNORED
        ]
    )
    assert trained == "12*34 =<call>3</call> 408 so \\boxed{408}<|im_end|>\n"
    assert out["input_ids"] == with_teacher["input_ids"]


def test_sft_trainer_takes_the_rows_as_they_are(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Plain chat rows train on the whole conversation; rows with labels keep their masks."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps(ROW) + "\n" + json.dumps({**ROW, "id": "y"}) + "\n")
    tokenized = tmp_path / "tokenized.jsonl"
    tokenized.write_text("".join(json.dumps({**ROW, **labelled(ROW, tokenizer)}) + "\n" for _ in range(2)))
    expected = labelled(ROW, tokenizer)
    for path, labels in ((plain, expected["input_ids"]), (tokenized, expected["labels"])):
        args = SFTConfig(
            output_dir=str(tmp_path / path.stem),
            max_steps=1,
            per_device_train_batch_size=2,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
        )
        data = datasets.load_dataset("json", data_files=str(path), split="train")
        trainer = SFTTrainer(
            model=str(STUDENT_DIR), args=args, train_dataset=data, processing_class=tokenizer
        )
        first = trainer.train_dataset[0]
        assert first["input_ids"][: len(expected["input_ids"])] == expected["input_ids"]
        assert first["labels"][: len(labels)] == labels
        assert trainer.train().training_loss > 0
    assert sft_dataset(plain, tokenizer)[0] == expected


# ------------------------------------------------------------- whole runs against the scripted server

ANSWER = "So 47*6 = 282, then 282 + 8 = 290. \\boxed{290}"
TOKENS = tokenize(ANSWER)
UNSURE = TOKENS.index(" 2")
REST = "".join(TOKENS[UNSURE + 3 :])


def data(tmp_path: Path, *rows: dict) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def generations(server: ScriptedServer, model: str) -> list[dict]:
    return [r for r in server.requests() if r["path"].startswith("/v1/") and r["model"] == model]


def test_confidence_splices_the_teacher_where_the_student_was_unsure(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    probs = [0.3 if i == UNSURE else None for i in range(len(TOKENS))]
    scripted.script("student", "C-1", [{"text": ANSWER, "probs": probs}, REST])
    scripted.script("teacher", "C-1", [" 282 and more"])
    scripted.script("student", "C-2", ["\\boxed{7}"])  # wrong: skipped
    dataset = load_jsonl(
        data(
            tmp_path,
            {"id": "a", "question": "C-1 47*6+8?", "answer": "290"},
            {"id": "b", "question": "C-2 2+2?", "answer": "4"},
        )
    )
    out = tmp_path / "sft.jsonl"
    options = ColdStartOptions(method="confidence", threshold=0.5, call_tokens=3, grade_workers=1)
    summary = asyncio.run(run_cold_start(relay_config(scripted), dataset, out, options))
    assert (summary.written, summary.incorrect, summary.failed) == (1, 1, {})
    (row,) = map(json.loads, out.read_text().splitlines())
    content = row["messages"][-1]["content"]
    assert content == "So 47*6 =<call>3</call> 282" + REST
    assert [content[a:b] for a, b in row["teacher_spans"]] == [" 282"]
    user = row["messages"][0]
    assert user["role"] == "user" and user["content"].startswith("C-1 47*6+8?")
    assert "Please reason step by step" in user["content"]  # the prompt as the relay sends it
    assert (row["calls"], row["correct"], row["method"]) == (1, True, "confidence")
    assert [json.loads(x)["id"] for x in skipped_path(out).read_text().splitlines()] == ["b"]
    before = len(scripted.requests())
    again = asyncio.run(run_cold_start(relay_config(scripted), dataset, out, options))
    assert (again.written, again.resumed, len(scripted.requests())) == (0, 2, before)


def test_random_inserts_commands_into_the_students_own_answer(
    scripted: ScriptedServer, tmp_path: Path, tokenizer
) -> None:  # type: ignore[no-untyped-def]
    scripted.script("student", "R-1", [ANSWER])
    dataset = load_jsonl(data(tmp_path, {"id": "r", "question": "R-1 47*6+8?", "answer": "290"}))
    out = tmp_path / "sft.jsonl"
    options = ColdStartOptions(method="random", calls=2, call_tokens=3, seed=5, grade_workers=1)
    summary = asyncio.run(run_cold_start(relay_config(scripted), dataset, out, options, tokenizer=tokenizer))
    assert summary.written == 1
    (row,) = map(json.loads, out.read_text().splitlines())
    content = row["messages"][-1]["content"]
    assert COMMAND.sub("", content) == ANSWER and row["calls"] == 2
    expected, ranges = insert_calls(ANSWER, TOKENS, random.Random("5:r"), calls=2, call_tokens=3)
    assert (content, row["teacher_spans"]) == (expected, [list(r) for r in ranges])
    assert (row["input_ids"], row["labels"]) == tuple(labelled(row, tokenizer).values())
    (request,) = generations(scripted, "student")
    assert request["body"]["logprobs"] == 0 and request["body"]["bad_words"] == ["<call>", "</call>"]
    assert generations(scripted, "teacher") == []


def test_the_command_writes_rows_and_refuses_an_unknown_method(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    scripted.script("student", "R-1", [ANSWER])
    path = data(tmp_path, {"id": "r", "question": "R-1 47*6+8?", "answer": "290"})
    out = tmp_path / "sft.jsonl"
    command = [CLI, "train", "cold-start", "--data", str(path), "--out", str(out), "--method", "random"]
    env = relay_env(scripted, tmp_path)
    done = subprocess.run(
        [*command, "--calls", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert "wrote 1 rows (random), skipped 0 incorrect answers; 0 done before" in done.stdout
    (row,) = map(json.loads, out.read_text().splitlines())
    assert row["calls"] == 2 and "labels" not in row  # no tokenizer configured: no labels
    bad = subprocess.run([*command, "--method", "guess"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown method 'guess'" in bad.stderr
