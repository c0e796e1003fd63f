"""The evaluation harness against the scripted server: exact figures on a fixed JSONL, resume,
refusals, interruption; grading and data loading on their own."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from fractions import Fraction
from pathlib import Path

import pytest

from relay_agents.eval import (
    DataError,
    EvalOptions,
    Grader,
    Problem,
    RunMismatch,
    extract_letter,
    grade_maths,
    load_data,
    load_jsonl,
    load_published,
    parse_settings,
    run_eval,
)
from relay_agents.eval.judge import verdict
from relay_agents.testing import ScriptedServer, tokenize
from tests.conftest import endpoint, relay_config
from tests.test_entry_points import CLI, relay_env

# ---------------------------------------------------------------------------- the fixed set

ROWS = [
    {"id": "e1", "question": "E-1 What is 2+3?", "answer": "5"},
    {"id": "e2", "question": "E-2 What is 7*8?", "answer": "56"},
    {"id": "e3", "question": "E-3 What is 9*9?", "answer": "81"},
    {"id": "e4", "question": "E-4 What is 6*7?", "answer": "42"},
]
#: The relay's student: e1 right alone, e3 wrong alone, e2 and e4 call the teacher for 2 tokens.
STUDENT = {
    "E-1": "2+3 = \\boxed{5}",
    "E-2": "7*8 =<call>2</call>",
    "E-3": "9*9 = \\boxed{80}",
    "E-4": "6*7 =<call>2</call>",
}
#: After the teacher's 2 tokens (` 56`, ` 43`) the student finishes.
CONTINUATION = {"<call>2</call> 56": " so \\boxed{56}", "<call>2</call> 43": " so \\boxed{43}"}
#: The teacher: right on e1..e3, wrong on e4.
TEACHER = {
    "E-1": " 5 so \\boxed{5}",
    "E-2": " 56 so \\boxed{56}",
    "E-3": " 81 so \\boxed{81}",
    "E-4": " 43 so \\boxed{43}",
}
#: The student-alone model: right on e1 only.
SOLO = {"E-1": "\\boxed{5}", "E-2": "\\boxed{54}", "E-3": "\\boxed{80}", "E-4": "\\boxed{41}"}


def tokens(*texts: str) -> int:
    return sum(len(tokenize(t)) for t in texts)


def script(server: ScriptedServer) -> None:
    for model, replies in (
        ("student", STUDENT),
        ("student", CONTINUATION),
        ("teacher", TEACHER),
        ("solo", SOLO),
    ):
        for match, text in replies.items():
            server.script(model, match, [text], repeat=True)


def write_data(path: Path, rows: list[dict] = ROWS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def options(server: ScriptedServer, **kw: object) -> EvalOptions:
    kw.setdefault("concurrency", 4)
    return EvalOptions(student_alone=endpoint(server, "solo"), **kw)  # type: ignore[arg-type]


def generation_requests(server: ScriptedServer) -> list[dict]:
    return [r for r in server.requests() if r["path"].startswith("/v1/")]


def prompts_sent(server: ScriptedServer) -> int:
    """Prompts in the generation requests (concurrent answers share a request with a list)."""
    return sum(len(r["prompt"]) if isinstance(r["prompt"], list) else 1 for r in generation_requests(server))


async def test_every_setting_on_a_fixed_set_gives_the_figures_worked_out_by_hand(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    script(scripted)
    data = load_jsonl(write_data(tmp_path / "fixed.jsonl"))
    summary = await run_eval(relay_config(scripted), [data], tmp_path / "out", options(scripted))
    rows = summary["datasets"]["fixed"]

    # relay: e1 and e2 right; the teacher wrote ` 56` and ` 43` (2 tokens each)
    relay_student = tokens(STUDENT["E-1"], STUDENT["E-3"]) + 2 * tokens(
        "7*8 =<call>2</call>", " so \\boxed{56}"
    )
    relay_share = Fraction(4, relay_student + 4)
    assert rows["relay"]["accuracy"] == 0.5
    assert rows["relay"]["teacher_share"] == pytest.approx(float(relay_share))
    assert rows["relay"]["teacher_calls_per_answer"] == 0.5
    # the student alone (the solo model): e1 only; the teacher alone: all but e4
    solo_tokens = tokens(*SOLO.values())
    teacher_tokens = tokens(*TEACHER.values())
    assert (rows["student"]["accuracy"], rows["student"]["teacher_share"]) == (0.25, 0.0)
    assert (rows["teacher"]["accuracy"], rows["teacher"]["teacher_share"]) == (0.75, 1.0)
    assert rows["teacher"]["teacher_tokens"] == teacher_tokens
    # teacher-free: the calls are banned, so e2 and e4 end at "7*8 =": no answer, wrong
    assert rows["teacher-free"]["accuracy"] == 0.25

    # the router at the relay's share: p*T / (p*T + (1-p)*S) = share
    p_cost = (
        relay_share
        * solo_tokens
        / (teacher_tokens - relay_share * teacher_tokens + relay_share * solo_tokens)
    )
    cost = rows["random-router@cost"]
    assert cost["p_teacher"] == pytest.approx(float(p_cost))
    assert cost["teacher_share"] == pytest.approx(float(relay_share))
    assert cost["accuracy"] == pytest.approx(float(Fraction(1, 4) + p_cost * Fraction(1, 2)))
    assert cost["draw"] == {
        "seed": 0,
        "accuracy": 0.25,
        "teacher_share": 0.0,
        "cost_usd": 0.0,
    }  # round(4p) = 0
    # the router at the relay's accuracy: half the questions to the teacher
    accuracy = rows["random-router@accuracy"]
    assert (accuracy["p_teacher"], accuracy["accuracy"]) == (0.5, 0.5)
    assert accuracy["teacher_share"] == pytest.approx(teacher_tokens / (teacher_tokens + solo_tokens))
    assert accuracy["draw"]["accuracy"] in (0.25, 0.5, 0.75)

    for matched in ("interval", "random"):
        assert rows[matched]["n"] == 4 and "knob" in rows[matched]
        assert summary["pinned"]["calibrated"][f"fixed/{matched}"]["target"] == pytest.approx(
            float(relay_share)
        )

    out = tmp_path / "out"
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 6 * 4  # six settings send requests, one answer per item
    assert set(lines[0]) >= {
        "id",
        "setting",
        "sample",
        "text",
        "spans",
        "extracted",
        "correct",
        "student_tokens",
        "teacher_tokens",
        "teacher_calls",
        "latency_s",
        "cost_usd",
        "error",
    }
    saved = json.loads((out / "summary.json").read_text())
    assert saved["settings"]["relay"]["accuracy"] == 0.5
    assert set(saved["settings"]) == set(
        parse_settings("relay,random-router@cost,random-router@accuracy,teacher-free,interval,random")
    )
    report = (out / "report.md").read_text()
    assert "thinking mode: off" in report and '"enable_thinking": false' in report
    assert data.sha256 in report and "student, teacher" not in report
    assert "| relay | 50.00 | 50.00 |" in report
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_a_rerun_sends_no_request_and_a_changed_setting_or_data_is_refused(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    script(scripted)
    path = write_data(tmp_path / "fixed.jsonl")
    config = relay_config(scripted)
    out = tmp_path / "out"
    chosen = ("relay", "student", "teacher")
    first = await run_eval(config, [load_jsonl(path)], out, options(scripted, settings=chosen))
    assert generation_requests(scripted)

    scripted.reset()  # forgets the recorded requests (and the scripts: any request would now differ)
    again = await run_eval(config, [load_jsonl(path)], out, options(scripted, settings=chosen))
    assert generation_requests(scripted) == []
    assert again["settings"] == first["settings"]
    assert again["throughput"]["answers_this_run"] == 0

    with pytest.raises(RunMismatch, match=r"student\.temperature: None -> 0\.7"):
        await run_eval(config, [load_jsonl(path)], out, options(scripted, settings=chosen, temperature=0.7))
    write_data(path, [*ROWS[:3], {**ROWS[3], "answer": "43"}])
    with pytest.raises(RunMismatch, match=r"data\.fixed\.sha256"):
        await run_eval(config, [load_jsonl(path)], out, options(scripted, settings=chosen))
    assert generation_requests(scripted) == []


async def test_an_interrupted_run_leaves_whole_lines_and_resumes_with_the_rest(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    script(scripted)
    scripted.configure(latency_s=0.3)
    data = load_jsonl(write_data(tmp_path / "fixed.jsonl"))
    out = tmp_path / "out"
    chosen = ("student", "teacher")
    task = asyncio.ensure_future(
        run_eval(relay_config(scripted), [data], out, options(scripted, settings=chosen, concurrency=1))
    )
    results = out / "results.jsonl"
    for _ in range(300):  # the first answer waits for a grading worker to start
        if results.exists() and results.read_text():
            break
        await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    partial = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert 0 < len(partial) < 8
    # a line cut short by a crash is dropped when the run resumes
    with (out / "results.jsonl").open("a") as f:
        f.write('{"dataset": "fixed", "id": "e')

    scripted.configure(latency_s=0.0)
    before = prompts_sent(scripted)
    summary = await run_eval(relay_config(scripted), [data], out, options(scripted, settings=chosen))
    assert prompts_sent(scripted) - before == 8 - len(partial)
    assert summary["settings"]["teacher"]["n"] == 4 and summary["settings"]["student"]["n"] == 4


async def test_an_item_that_errors_is_recorded(scripted: ScriptedServer, tmp_path: Path) -> None:
    script(scripted)
    scripted.script("solo", "E-3", [{"fault": "500"}], repeat=True)
    data = load_jsonl(write_data(tmp_path / "fixed.jsonl"))
    summary = await run_eval(
        relay_config(scripted), [data], tmp_path / "out", options(scripted, settings=("student",))
    )
    row = summary["settings"]["student"]
    assert (row["n"], row["errors"], row["accuracy"]) == (4, 1, 0.25)
    failed = [
        json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines() if '"e3"' in x
    ]
    assert failed[0]["error"].startswith("InternalServerError")


async def test_a_judge_rechecks_only_the_failures_in_a_column_of_its_own(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    script(scripted)
    scripted.script("judge", "Reference answer", ["NO"], repeat=True)
    scripted.script("judge", "\\boxed{54}", ["Yes."], repeat=True)  # the solo student's e2
    scripted.script("judge", "\\boxed{41}", ["maybe"], repeat=True)  # the solo student's e4
    scripted.faults("judge", ["500"])  # the first re-check (the relay's e3) fails
    data = load_jsonl(write_data(tmp_path / "fixed.jsonl"))
    judge = endpoint(scripted, "judge", api="chat", max_retries=0)
    chosen = ("relay", "student")
    summary = await run_eval(
        relay_config(scripted),
        [data],
        tmp_path / "out",
        options(scripted, settings=chosen, judge=judge, concurrency=1),
    )
    rows = summary["datasets"]["fixed"]
    # the rules' accuracy is unchanged; the judge's verdicts are their own figures
    assert rows["relay"]["accuracy"] == 0.5 and rows["student"]["accuracy"] == 0.25
    lines = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    failed = [x for x in lines if not x["correct"]]
    assert len(failed) == 5  # relay: e3, e4; the solo student: e2, e3, e4
    assert all(x["recheck"] is None and x["recheck_reply"] is None for x in lines if x["correct"])
    judged = [r for r in scripted.requests() if r["body"].get("model") == "judge"]
    assert all(r["path"] == "/v1/chat/completions" for r in judged)
    prompts = [r["body"]["messages"][0]["content"] for r in judged]
    assert len(prompts) == 5 and sum("Reference answer: 81" in p for p in prompts) == 2
    verdicts = {(x["setting"], x["id"]): x for x in failed}
    assert verdicts[("relay", "e3")]["recheck_error"].startswith("InternalServerError")
    assert [verdicts[key]["recheck"] for key in sorted(verdicts)] == [
        None,  # relay e3: the request failed
        False,  # relay e4: NO
        True,  # student e2: Yes.
        False,  # student e3: NO
        None,  # student e4: maybe
    ]
    relay, student = rows["relay"], rows["student"]
    assert (relay["recheck_accepted"], relay["recheck_undecided"], relay["accuracy_rechecked"]) == (0, 1, 0.5)
    assert (student["recheck_accepted"], student["recheck_undecided"]) == (1, 1)
    assert student["accuracy_rechecked"] == 0.5
    assert summary["settings"]["student"]["accuracy_rechecked"] == 0.5
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Re-checked avg." in report and "re-check of the failures by judge" in report
    assert summary["pinned"]["judge"]["model"] == "judge"


def test_the_judges_verdict_is_its_first_word() -> None:
    assert [verdict(r) for r in ("YES", " yes.", "**No**", "No, it is 5", "Maybe", "")] == [
        True,
        True,
        False,
        False,
        None,
        None,
    ]


# ---------------------------------------------------------------------------- grading

EQUIVALENT = [
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("The answer is \\boxed{1,000}.", "1000"),
    ("\\boxed{1000}", "1,000"),
    ("\\boxed{\\dfrac{3}{4}}", "0.75"),
    ("\\boxed{5 \\text{ cm}}", "5"),
    ("\\boxed{(1, 2]}", "(1,2]"),
    ("\\boxed{\\{2,1\\}}", "\\{1,2\\}"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}"),
    ("\\boxed{x=3}", "3"),
    ("so \\boxed{\\boxed{7}} and \\boxed{\\frac{2}{4}}", "\\frac12"),
    ("The final answer is 56.", "56"),
]
DIFFERENT = [
    ("\\boxed{0.33}", "\\frac{1}{3}"),
    ("\\boxed{(1,2)}", "[1,2]"),
    ("\\boxed{\\{1,2\\}}", "\\{1,3\\}"),
    ("7*8 =", "56"),
    ("no answer", "4"),
]


@pytest.mark.parametrize(("text", "gold"), EQUIVALENT)
def test_equivalent_answers_are_correct(text: str, gold: str) -> None:
    assert grade_maths(text, gold).correct


@pytest.mark.parametrize(("text", "gold"), DIFFERENT)
def test_different_answers_are_wrong(text: str, gold: str) -> None:
    assert not grade_maths(text, gold).correct


async def test_the_grader_grades_in_worker_processes() -> None:
    problems = [Problem("a", "q", "\\frac{1}{2}"), Problem("b", "q", "B", choices=("x", "y", "z"))]
    with Grader(workers=1) as grader:
        grades = await asyncio.gather(
            grader.grade("\\boxed{0.5}", problems[0]), grader.grade("The answer is (B).", problems[1])
        )
    assert [(g.extracted, g.correct) for g in grades] == [("0.5", True), ("B", True)]


def test_letters_are_extracted() -> None:
    assert extract_letter("so \\boxed{C}", 4) == "C"
    assert extract_letter("The answer is (b).", 4) == "B"
    assert extract_letter("Answer: D", 4) == "D"
    assert extract_letter("I pick E", 4) is None
    assert extract_letter("A or B? I think B.", 4) == "B"


# ---------------------------------------------------------------------------- data


def test_jsonl_ids_gsm8k_golds_choices_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        '{"question": "q1", "answer": "He has #### 1,234"}\n\n'
        '{"id": "mc", "question": "q2", "answer": "B", "choices": ["one", "two"]}\n'
    )
    data = load_jsonl(path)
    assert [(p.id, p.answer, p.choices) for p in data.problems] == [
        ("1", "1234", ()),
        ("mc", "B", ("one", "two")),
    ]
    assert data.problems[1].prompt.endswith("A. one\nB. two\n\nAnswer with the letter of the correct option.")
    path.write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match=r"mixed.jsonl:1: row 1: need question and answer"):
        load_jsonl(path)
    path.write_text('{"id": 1, "question": "q", "answer": 1}\n{"id": 1, "question": "q", "answer": 2}\n')
    with pytest.raises(DataError, match="appears twice"):
        load_jsonl(path)


def test_generated_sets_are_seeded() -> None:
    first = load_data("reasoning-gym:basic_arithmetic", size=3, seed=5)
    assert len(first.problems) == 3 and first.name == "reasoning-gym:basic_arithmetic"
    assert load_data("reasoning-gym:basic_arithmetic", size=3, seed=5).sha256 == first.sha256
    assert load_data("reasoning-gym:basic_arithmetic", size=3, seed=6).sha256 != first.sha256
    tiny = load_data("tiny", size=5)
    assert len(tiny.problems) == 5 and tiny.problems[0].question.startswith("Compute ")


def test_published_sets_load_from_local_files_in_the_hubs_format(tmp_path: Path) -> None:
    gsm8k = tmp_path / "gsm8k.jsonl"
    gsm8k.write_text(json.dumps({"question": "How many?", "answer": "3 + 4 = 7\n#### 7"}) + "\n")
    assert [(p.question, p.answer) for p in load_published("gsm8k", data_files=gsm8k).problems] == [
        ("How many?", "7")
    ]
    mmlu = tmp_path / "mmlu-pro.jsonl"
    mmlu.write_text(
        json.dumps(
            {
                "question_id": 70,
                "question": "Pick",
                "options": ["a", "b", "c"],
                "answer": "C",
                "answer_index": 2,
            }
        )
        + "\n"
    )
    assert load_published("mmlu-pro", data_files=mmlu).problems[0] == Problem(
        "70", "Pick", "C", ("a", "b", "c")
    )
    math500 = tmp_path / "math500.jsonl"
    math500.write_text(
        json.dumps({"problem": "Half?", "answer": "\\frac12", "unique_id": "test/x.json"}) + "\n"
    )
    assert load_published("math500", data_files=math500).problems[0].id == "test/x.json"
    # BIG-Bench Hard: one task by name (bbh/TASK), its input and target columns, from Parquet
    import datasets

    bbh = tmp_path / "bbh.parquet"
    datasets.Dataset.from_list([{"input": "not ( True ) and ( True ) is", "target": "False"}]).to_parquet(bbh)
    loaded = load_published("bbh/boolean_expressions", data_files=bbh)
    assert (loaded.name, loaded.problems) == (
        "bbh/boolean_expressions",
        (Problem("0", "not ( True ) and ( True ) is", "False"),),
    )
    assert loaded.source == str(bbh) and len(loaded.sha256) == 64
    with pytest.raises(DataError, match="unknown data set 'nope'"):
        load_published("nope", data_files=gsm8k)


def test_a_published_set_without_a_pinned_revision_is_refused() -> None:
    with pytest.raises(DataError, match=r"gsm8k@REVISION"):
        load_data("gsm8k")
    with pytest.raises(ValueError, match="unknown settings: nope"):
        parse_settings("relay,nope")


# ---------------------------------------------------------------------------- the command


def eval_command(server: ScriptedServer, tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    data = write_data(tmp_path / "fixed.jsonl")
    command = [CLI, "eval", "--data", str(data), "--out", str(tmp_path / "out"), *args]
    return subprocess.Popen(
        command, env=relay_env(server, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_the_command_writes_the_outputs_and_refuses_a_changed_setting(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    script(scripted)
    done = eval_command(scripted, tmp_path, "--settings", "relay,teacher")
    stdout, stderr = done.communicate(timeout=180)
    assert done.returncode == 0, stderr
    assert "relay: accuracy 50.0%" in stdout and "teacher: accuracy 75.0%" in stdout
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {
        "results.jsonl",
        "summary.json",
        "report.md",
        "pareto.png",
    }

    refused = eval_command(scripted, tmp_path, "--settings", "relay,teacher", "--temperature", "0.5")
    _, stderr = refused.communicate(timeout=180)
    assert refused.returncode == 2
    assert "refusing to mix them" in stderr and "temperature" in stderr


def test_the_command_takes_a_separate_student_alone_model_and_a_judge(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    script(scripted)
    scripted.script("judge", "Reference answer", ["YES"], repeat=True)
    done = eval_command(
        scripted,
        tmp_path,
        "--settings",
        "student",
        "--student-alone-url",
        scripted.base_url,
        "--student-alone-model",
        "solo",
        "--judge-url",
        scripted.base_url,
        "--judge-model",
        "judge",
    )
    stdout, stderr = done.communicate(timeout=180)
    assert done.returncode == 0, stderr
    assert "student: accuracy 25.0%" in stdout  # the solo model's answers, not the relay student's
    models = {r["body"].get("model") for r in generation_requests(scripted)}
    assert models == {"solo", "judge"}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["pinned"]["student_alone"]["model"] == "solo"
    assert summary["settings"]["student"]["accuracy_rechecked"] == 1.0

    half = eval_command(scripted, tmp_path, "--student-alone-url", scripted.base_url)
    _, stderr = half.communicate(timeout=60)
    assert half.returncode == 2 and "--student-alone-url and --student-alone-model go together" in stderr


def test_ctrl_c_leaves_a_valid_partial_results_file(scripted: ScriptedServer, tmp_path: Path) -> None:
    script(scripted)
    scripted.configure(latency_s=0.5)
    running = eval_command(scripted, tmp_path, "--settings", "teacher", "--concurrency", "1")
    results = tmp_path / "out" / "results.jsonl"
    deadline = time.monotonic() + 120
    while not (results.exists() and results.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    running.send_signal(signal.SIGINT)
    _, stderr = running.communicate(timeout=60)
    assert running.returncode == 130, stderr
    assert "run the same command again to resume" in stderr
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert 1 <= len(lines) < 4 and all(x["setting"] == "teacher" for x in lines)
