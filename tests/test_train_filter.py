"""The teacher-pass filter: its rules, and whole runs against the scripted server over real HTTP
(the teacher's k answers in one request with ``n``, grading, keep/drop, resume)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from relay_agents.eval import load_jsonl
from relay_agents.testing import ScriptedServer
from relay_agents.train.filter import (
    FilterMismatch,
    FilterOptions,
    dropped_path,
    parse_rule,
    run_filter,
)
from tests.conftest import relay_config
from tests.test_entry_points import CLI, relay_env


@pytest.mark.parametrize(
    ("rule", "passes", "samples", "kept"),
    [
        ("any", 1, 16, True),
        ("any", 0, 16, False),
        ("max-failures:5/10", 5, 10, True),  # fails 5 of 10: kept
        ("max-failures:5/10", 4, 10, False),  # fails 6 of 10: dropped
        ("max-failures:5/10", 8, 16, True),  # 8 failures of 16 is the same share
        ("max-failures:5/10", 7, 16, False),
        ("max-failures:0/1", 3, 3, True),
        ("max-failures:0/1", 2, 3, False),
        ("max-failures:1/1", 0, 4, True),
    ],
)
def test_rules(rule: str, passes: int, samples: int, kept: bool) -> None:
    assert parse_rule(rule).keeps(passes, samples) is kept


@pytest.mark.parametrize(
    "text", ["all", "max-failures:6/5", "max-failures:1/0", "max-failures:5", "max-failures:a/b"]
)
def test_bad_rules_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rule(text)


ROWS = [
    {"id": "f1", "question": "F-1 What is 2+3?", "answer": "5"},
    {"id": "f2", "question": "F-2 What is 7*8?", "answer": "56"},
    {"id": "f3", "question": "F-3 What is 9*9?", "answer": "81", "choices": None},
]
#: Four teacher answers per problem: f1 right 4 times, f2 once, f3 never.
TEACHER = {
    "F-1": ["\\boxed{5}"] * 4,
    "F-2": ["\\boxed{56}", "\\boxed{54}", "\\boxed{55}", "I do not know"],
    "F-3": ["\\boxed{80}"] * 4,
}


def setup(server: ScriptedServer, tmp_path: Path) -> Path:
    for match, replies in TEACHER.items():
        server.script("teacher", match, replies, repeat=True)
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return data


def generations(server: ScriptedServer) -> list[dict]:
    return [r for r in server.requests() if r["path"].startswith("/v1/")]


def rows(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_k_answers_in_one_request_are_graded_and_split_by_the_rule(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    data = load_jsonl(setup(scripted, tmp_path))
    out = tmp_path / "kept.jsonl"
    options = FilterOptions(k=4, rule=parse_rule("max-failures:1/2"), grade_workers=1)
    seen: list[dict] = []
    summary = asyncio.run(run_filter(relay_config(scripted), data, out, options, on_done=seen.append))
    assert (summary.kept, summary.dropped, summary.resumed, summary.failed) == (1, 2, 0, {})
    kept, dropped = rows(out), rows(dropped_path(out))
    assert set(kept) == {"f1"} and set(dropped) == {"f2", "f3"}
    assert [
        kept["f1"]["teacher_passes"],
        dropped["f2"]["teacher_passes"],
        dropped["f3"]["teacher_passes"],
    ] == [4, 1, 0]
    assert kept["f1"] | {} == {
        "id": "f1",
        "question": "F-1 What is 2+3?",
        "answer": "5",
        "teacher_passes": 4,
        "teacher_samples": 4,
        "rule": "max-failures:1/2",
        "kept": True,
    }
    assert len(seen) == 3
    sent = generations(scripted)
    assert len(sent) == 3  # one request per problem
    assert all(r["model"] == "teacher" and r["body"]["n"] == 4 for r in sent)
    assert all(r["body"]["temperature"] == 0.7 and r["body"]["top_p"] == 0.95 for r in sent)
    assert all("Please reason step by step" in r["prompt"] for r in sent)
    # the kept file is data the loaders read as is
    assert [p.id for p in load_jsonl(out).problems] == ["f1"]


def test_a_rerun_resumes_and_other_settings_are_refused(scripted: ScriptedServer, tmp_path: Path) -> None:
    data = load_jsonl(setup(scripted, tmp_path))
    out = tmp_path / "kept.jsonl"
    options = FilterOptions(k=4, rule=parse_rule("any"), grade_workers=1)
    first = asyncio.run(run_filter(relay_config(scripted), data, out, options))
    assert (first.kept, first.dropped) == (2, 1)
    before = len(generations(scripted))
    again = asyncio.run(run_filter(relay_config(scripted), data, out, options))
    assert (again.kept, again.dropped, again.resumed) == (0, 0, 3)
    assert len(generations(scripted)) == before
    with pytest.raises(FilterMismatch, match="k=4"):
        asyncio.run(run_filter(relay_config(scripted), data, out, FilterOptions(k=8)))


def test_one_answer_per_request_seeds_each_and_a_failing_problem_is_retried_later(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    data = load_jsonl(setup(scripted, tmp_path))
    out = tmp_path / "kept.jsonl"
    config = relay_config(scripted, teacher={"seed": 10, "max_retries": 0})
    scripted.faults("teacher", ["400"])
    options = FilterOptions(k=4, per_request=1, concurrency=1, grade_workers=1)
    summary = asyncio.run(run_filter(config, data, out, options))
    assert len(summary.failed) == 1 and summary.kept + summary.dropped == 2
    sent = generations(scripted)
    assert all(r["body"].get("n") == 1 for r in sent)
    assert sorted({r["body"]["seed"] for r in sent}) == [10, 11, 12, 13]
    retried = asyncio.run(run_filter(config, data, out, options))
    assert retried.failed == {} and retried.resumed == 2 and retried.kept + retried.dropped == 1


def test_requests_of_a_problem_with_a_seeded_teacher_get_their_own_seeds(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    dataset = load_jsonl(setup(scripted, tmp_path))
    config = relay_config(scripted, teacher={"seed": 3})
    options = FilterOptions(k=4, per_request=3, grade_workers=1)
    summary = asyncio.run(run_filter(config, dataset, tmp_path / "kept.jsonl", options))
    assert summary.kept + summary.dropped == 3
    sent = [(r["body"]["n"], r["body"]["seed"]) for r in generations(scripted) if "F-1" in r["prompt"]]
    assert sorted(sent) == [(1, 4), (3, 3)]  # 4 answers: a request of 3, then one of 1
    assert rows(tmp_path / "kept.jsonl")["f1"]["teacher_passes"] == 4


def test_the_command_filters_resumes_and_refuses_a_bad_rule(scripted: ScriptedServer, tmp_path: Path) -> None:
    data = setup(scripted, tmp_path)
    env = relay_env(scripted, tmp_path)
    out = tmp_path / "kept.jsonl"
    command = [CLI, "train", "filter", "--data", str(data), "--out", str(out), "-k", "4"]
    done = subprocess.run(
        [*command, "--rule", "max-failures:1/2"], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    assert "kept 1, dropped 2 (rule max-failures:1/2, k=4); 0 filtered before" in done.stdout
    assert set(rows(out)) == {"f1"}
    other = subprocess.run([*command, "--rule", "any"], env=env, capture_output=True, text=True, timeout=180)
    assert other.returncode == 2 and "use another --out" in other.stderr
    bad = subprocess.run([*command, "--rule", "most"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown rule 'most'" in bad.stderr
