"""The tiny world's task family, shared tokenizer and grader (fast; no torch)."""

from __future__ import annotations

import random
import re

from relay_agents.tiny import tasks

CALL_RE = re.compile(r"<call>(\d+)</call>")


def test_generation_is_deterministic():
    assert tasks.eval_problems(50) == tasks.eval_problems(50)
    assert tasks.train_problems(50, seed=3) == tasks.train_problems(50, seed=3)
    assert tasks.train_problems(50, seed=3) != tasks.train_problems(50, seed=4)
    assert tasks.make_problem(random.Random(7)) == tasks.make_problem(random.Random(7))


def test_train_and_eval_are_disjoint():
    held_out = {p.question for p in tasks.eval_problems(tasks.EVAL_RESERVE)}
    train = tasks.train_problems(3000, seed=0)
    assert not held_out & {p.question for p in train}
    assert len({p.question for p in tasks.eval_problems(500)}) == 500


def test_solutions_are_consistent():
    for p in tasks.eval_problems(300):
        hard = [s for s in p.steps if s.hard]
        assert len(hard) == 1 and 100 <= hard[0].result <= 999
        assert 3 <= len(p.steps) - 1 <= 5
        # the question evaluates to the gold answer
        expr = p.question.removeprefix("Compute ").removesuffix(".")
        assert eval(expr) == p.answer
        teacher = tasks.teacher_solution(p)
        student = tasks.student_solution(p)
        assert tasks.is_correct(teacher, p.gold)
        assert tasks.is_correct(student, p.gold)
        # removing the calls (relay protocol: replace by a space) gives the teacher text
        assert re.sub(" +", " ", CALL_RE.sub(" ", student)) == teacher
        assert student.count("<call>") == 1
        assert p.user_message.endswith(tasks.INSTRUCTION)


def test_student_segments_roles():
    p = tasks.eval_problems(1)[0]
    segs = tasks.student_segments(p)
    assert [s.role for s in segs] == ["student", "call", "teacher", "student"]
    assert segs[1].text == "<call>4</call>"
    assert segs[2].text == f" {p.steps[0].result}"
    assert segs[3].text.startswith("\n") and segs[3].text.endswith(f"\\boxed{{{p.answer}}}")


def test_call_n_equals_tokenizer_count():
    from relay_agents.tiny.tokenizer import (
        IM_END,
        render_chat,
        tokenizer_corpus,
        train_tokenizer,
    )

    tok = train_tokenizer(tokenizer_corpus(tasks.train_problems(500, seed=10_000)))
    assert tok.token_to_id("<call>") is not None and tok.token_to_id("</call>") is not None
    for p in tasks.eval_problems(100):
        prompt = render_chat([{"role": "user", "content": p.user_message}])
        segs = tasks.student_segments(p)
        full = prompt + "".join(s.text for s in segs) + IM_END
        ids = tok.encode(full).ids
        # the segments tokenize on their own exactly as inside the full text
        assert [
            *sum((tok.encode(s.text).ids for s in segs), tok.encode(prompt).ids),
            tok.token_to_id(IM_END),
        ] == ids
        n = int(CALL_RE.search(segs[1].text).group(1))
        assert n == len(tok.encode(segs[2].text).ids)
        # the teacher's result, in the teacher view after the call (double space collapsed)
        view = CALL_RE.sub(" ", "".join(s.text for s in segs)).strip()
        teacher_ids = tok.encode(prompt + tasks.teacher_solution(p)).ids
        assert tok.encode(prompt + view).ids == teacher_ids
        # digits are single tokens, <call> tokens are atomic
        assert tok.encode("<call>4</call>").tokens == ["<call>", "4", "</call>"]
        assert tok.encode(" 282").tokens == ["Ġ", "2", "8", "2"]
        assert tok.decode(ids, skip_special_tokens=False) == full


def test_grader():
    assert tasks.extract_boxed("so \\boxed{12} and \\boxed{ 345 }") == "345"
    assert tasks.extract_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert tasks.extract_boxed("no box") is None
    assert tasks.extract_boxed("\\boxed{12") is None
    assert tasks.is_correct("x\n\\boxed{292}", "292")
    assert tasks.is_correct("\\boxed{292}", 292)
    assert tasks.is_correct("\\boxed{292.0}", "292")
    assert not tasks.is_correct("\\boxed{293}", "292")
    assert not tasks.is_correct("292", "292")


def _micro_recipe():
    """A recipe that builds in seconds."""
    from relay_agents.tiny import build

    micro = build.ModelRecipe(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        steps=2,
        batch_size=4,
        lr=1e-3,
        warmup=1,
        n_train=16,
        seed=0,
    )
    return build.Recipe(teacher=micro, student=micro, tokenizer_problems=100)


def test_build_cache_verifies_and_rebuilds(tmp_path):
    """A micro recipe: cached pair reused; corrupt or foreign dirs are rebuilt, never used."""
    import json

    from relay_agents.tiny import build

    recipe = _micro_recipe()
    micro = recipe.teacher
    pair = build.build_tiny_pair(tmp_path, recipe=recipe)
    root = pair.root
    assert root == tmp_path / recipe.digest()
    assert build.verify_pair(root, recipe.digest())
    assert pair.solo_dir == root / "solo"
    manifest = json.loads((root / build.MANIFEST).read_text())
    assert {rel.split("/")[0] for rel in manifest["files"]} == {"teacher", "student", "solo"}
    assert manifest["recipe"]["solo"] is None and recipe.solo_recipe == recipe.student
    assert set(build.read_stats(pair)) >= {"teacher", "student", "solo", "build_seconds"}
    for d in (pair.student_dir, pair.teacher_dir, pair.solo_dir):
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        assert cfg["eos_token"] == "<|im_end|>" and "chat_template" in cfg
        assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] is not None
    first = (pair.teacher_dir / "model.safetensors").read_bytes()
    mtime = (root / build.MANIFEST).stat().st_mtime_ns
    assert build.build_tiny_pair(tmp_path, recipe=recipe) == pair  # cached
    assert (root / build.MANIFEST).stat().st_mtime_ns == mtime
    # corrupt a file: rebuilt (deterministically: same weights)
    (pair.student_dir / "model.safetensors").write_bytes(b"garbage")
    assert not build.verify_pair(root, recipe.digest())
    build.build_tiny_pair(tmp_path, recipe=recipe)
    assert build.verify_pair(root, recipe.digest())
    assert (pair.teacher_dir / "model.safetensors").read_bytes() == first
    # the intact models were reused from the old build, the corrupt one retrained
    stats = build.read_stats(pair)
    assert stats["teacher"]["reused_from"] == recipe.digest() and "reused_from" not in stats["student"]
    # a build without the solo student (an older layout) is not accepted
    import shutil

    shutil.rmtree(pair.solo_dir)
    assert not build.verify_pair(root, recipe.digest())
    build.build_tiny_pair(tmp_path, recipe=recipe)
    assert build.verify_pair(root, recipe.digest())
    # a manifest from another recipe is not accepted
    other = build.Recipe(teacher=micro, student=micro, tokenizer_problems=101)
    assert not build.verify_pair(root, other.digest())
    # no temporary build dirs are left behind
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [recipe.digest()]


def test_a_build_shows_each_models_steps_rate_and_eta(tmp_path, capfd):
    """The training bars, rendered on a terminal console (any file will do); transformers' own
    "Writing model shards" bars stay off."""
    import io

    from rich.console import Console

    from relay_agents.progress import step_bars
    from relay_agents.tiny import build

    screen = io.StringIO()
    with step_bars(Console(file=screen, force_terminal=True, color_system=None, width=120)) as bars:
        build.build_tiny_pair(tmp_path, recipe=_micro_recipe(), progress=bars)
    shown = screen.getvalue()
    for name in ("teacher", "student", "solo"):
        assert re.search(rf"{name} .*2/2 .*steps/s .*ETA", shown), shown
    assert "Writing model shards" not in "".join(capfd.readouterr())
    # not a terminal (a CI log): no bars at all
    quiet = io.StringIO()
    with step_bars(Console(file=quiet)) as bars:
        build.build_tiny_pair(tmp_path, recipe=_micro_recipe(), progress=bars, force=True)
    assert quiet.getvalue() == ""


def test_solo_recipe_and_pair_compat():
    from relay_agents.tiny import build

    r = build.DEFAULT_RECIPE
    # the solo student has the student's size and training budget; only the chat history the
    # student also sees is left out (the table asks single questions)
    assert r.solo_recipe == build.dataclasses.replace(r.student, history_fraction=0.0)
    assert r.student.history_fraction > 0
    assert build.Recipe(teacher=r.teacher, student=r.student).solo_recipe == r.student
    other = build.Recipe(teacher=r.teacher, student=r.student, solo=r.teacher)
    assert other.solo_recipe == r.teacher and other.digest() != r.digest()
    # TinyPair stays constructible the old way
    old = build.TinyPair(student_dir=build.Path("/x/student"), teacher_dir=build.Path("/x/teacher"))
    assert old.solo_dir is None and old.root == build.Path("/x")


def test_solo_examples_learn_the_hard_results():
    """The solo student is trained like the teacher: loss on every answer token."""
    from relay_agents.tiny import build
    from relay_agents.tiny.tokenizer import tokenizer_corpus, train_tokenizer

    tok = train_tokenizer(tokenizer_corpus(tasks.train_problems(300, seed=10_000)))
    p = tasks.eval_problems(1)[0]
    ((solo_ids, solo_labels),) = build.build_examples(tok, [p], student=False)
    ((st_ids, st_labels),) = build.build_examples(tok, [p], student=True)
    hard = f"{p.steps[0].result}"
    assert hard in tok.decode([t for t in solo_labels if t != -100])
    assert tok.token_to_id("<call>") not in solo_ids and tok.token_to_id("<call>") in st_ids
    assert hard not in tok.decode([t for t in st_labels if t != -100]).split("\n")[0]
    # chat history: an earlier exchange in the prompt, never in the loss
    prior = tasks.eval_problems(2)[1]
    _, (hist_ids, hist_labels) = build.build_examples(tok, [prior, p], student=True, history_fraction=1.0)
    assert tok.decode(hist_ids, skip_special_tokens=False).count("<|im_start|>user") == 2
    assert tasks.teacher_solution(prior) in tok.decode(hist_ids)
    assert [t for t in hist_labels if t != -100] == [t for t in st_labels if t != -100]


def test_tiny_configs_four_settings(tmp_path):
    """The four table settings as relay configs (servers never started: only URLs)."""
    from relay_agents.serving import VLLMServer
    from relay_agents.tiny import build
    from relay_agents.tiny.evaluate import SETTINGS, tiny_configs
    from relay_agents.tiny.servers import TinyPairServers

    pair = build.TinyPair(tmp_path / "student", tmp_path / "teacher", tmp_path / "solo")
    student = VLLMServer(pair.student_dir, served_model_name="tiny-student", port=8001)
    teacher = VLLMServer(pair.teacher_dir, served_model_name="tiny-teacher", port=8002)
    solo = VLLMServer(pair.solo_dir, served_model_name="tiny-solo", port=8003)
    servers = TinyPairServers(student, teacher, pair)
    configs = tiny_configs(servers, solo, temperature=0.7, seed=5)
    assert tuple(configs) == SETTINGS
    seat = {name: (c.student.model, c.teacher.model, c.policy) for name, c in configs.items()}
    assert seat == {
        "student_alone": ("tiny-solo", "tiny-teacher", "teacher_free"),
        "teacher_free": ("tiny-student", "tiny-teacher", "teacher_free"),
        "relay": ("tiny-student", "tiny-teacher", "command"),
        "teacher_alone": ("tiny-teacher", "tiny-teacher", "teacher_free"),
    }
    for c in configs.values():
        for ep in (c.student, c.teacher):
            assert (ep.temperature, ep.seed, ep.api) == (0.7, 5, "completions")
            assert ep.tokenizer_path is not None and ep.tokenizer_path.name == ep.model.removeprefix("tiny-")
    assert configs["student_alone"].student.base_url == "http://127.0.0.1:8003/v1"
    greedy = tiny_configs(servers, None)
    assert "student_alone" not in greedy and greedy["relay"].student.temperature == 0.0
