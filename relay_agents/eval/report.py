"""``report.md`` (the table in the published layout, then the pinned settings) and
``pareto.png`` (accuracy against teacher-token share)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from relay_agents.eval.metrics import router_accuracy, router_share
from relay_agents.eval.settings import INTERVAL, SETTINGS, STUDENT, TEACHER


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _judged(summary: dict[str, Any]) -> bool:
    return summary["pinned"].get("judge") is not None


def _accuracy_table(summary: dict[str, Any]) -> list[str]:
    """Rows: settings; columns: each data set's accuracy (%), their average, and the average
    teacher-token share (%), as the RelayLLM paper lays out its main table; with a judge, the
    re-checked average in a column of its own."""
    names = list(summary["datasets"])
    judged = _judged(summary)
    header = ["Setting", *names, "Avg.", "Teacher tokens %", *(["Re-checked avg."] if judged else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setting, row in summary["settings"].items():
        cells = [_pct(summary["datasets"][n].get(setting, {}).get("accuracy")) for n in names]
        recheck = f" {_pct(row.get('accuracy_rechecked'))} |" if judged else ""
        lines.append(
            f"| {setting} | " + " | ".join(cells) + f" | {_pct(row.get('accuracy'))} | "
            f"{_pct(row.get('teacher_share'))} |" + recheck
        )
    return lines


def _detail_table(rows: dict[str, Any], judged: bool) -> list[str]:
    header = (
        "| Setting | Accuracy % | pass@K % | Teacher tokens % | Calls/answer | Cost USD | p50 s | p99 s "
        "| Malformed | Teacher failures | Errors | Answers |"
        + (" Re-checked % | Accepted by the judge | Undecided |" if judged else "")
    )
    lines = [header, "|" + "---|" * (15 if judged else 12)]
    for setting in SETTINGS:
        row = rows.get(setting)
        if row is None:
            continue
        if "skipped" in row:
            lines.append(f"| {setting} | skipped: {row['skipped']} |" + " |" * (13 if judged else 10))
            continue
        note = f" (p={row['p_teacher']:.3f})" if "p_teacher" in row else ""
        if "knob" in row:
            note += f" (every {row['knob']:g} tokens)" if setting == INTERVAL else f" (rate {row['knob']:g})"
        lines.append(
            f"| {setting}{note} | {_pct(row['accuracy'])} | {_pct(row.get('pass_at_k'))} | "
            f"{_pct(row['teacher_share'])} | {row['teacher_calls_per_answer']:.3f} | {row['cost_usd']:.6f} | "
            f"{_seconds(row.get('latency_p50_s'))} | {_seconds(row.get('latency_p99_s'))} | "
            f"{row.get('malformed_commands', '–')} | {row.get('teacher_failures', '–')} | "
            f"{row.get('errors', '–')} | {row['n']} |"
            + (
                f" {_pct(row.get('accuracy_rechecked'))} | {row.get('recheck_accepted', '–')} | "
                f"{row.get('recheck_undecided', '–')} |"
                if judged
                else ""
            )
        )
    for setting in SETTINGS:
        draw = rows.get(setting, {}).get("draw")
        if draw:
            lines.append("")
            lines.append(
                f"{setting}, one draw (seed {draw['seed']}): accuracy {_pct(draw['accuracy'])} %, "
                f"teacher tokens {_pct(draw['teacher_share'])} %, cost {draw['cost_usd']:.6f} USD."
            )
    return lines


def report_markdown(summary: dict[str, Any]) -> str:
    pinned = summary["pinned"]
    throughput = summary["throughput"]
    parts = ["# Evaluation report", "", "Accuracy in %, by data set:", "", *_accuracy_table(summary)]
    for name, rows in summary["datasets"].items():
        parts += ["", f"## {name}", "", *_detail_table(rows, _judged(summary))]
    rate = throughput["answers_per_s"]
    parts += [
        "",
        "## Run",
        "",
        f"{throughput['answers_this_run']} answers in this invocation, {throughput['wall_s']:.1f} s, "
        + (f"{rate:.2f} answers/s" if rate else "no new answers")
        + f" at concurrency {throughput['concurrency']}.",
        "",
        "## Pinned settings",
        "",
        f"- relay-agents {pinned['relay_agents_version']}",
        f"- models as served: student {', '.join(pinned['models_as_served']['student']) or '–'}; "
        f"teacher {', '.join(pinned['models_as_served']['teacher']) or '–'}",
        f"- thinking mode: {'on' if pinned['enable_thinking'] else 'off'}; chat-template options: "
        f"`{json.dumps(pinned['chat_template_kwargs'])}`",
        f"- student temperature {pinned['student']['temperature']}, top_p {pinned['student']['top_p']}; "
        f"teacher temperature {pinned['teacher']['temperature']}, top_p {pinned['teacher']['top_p']}",
        f"- seed {pinned['seed']} (sample k uses seed + k), K = {pinned['samples']}",
        f"- token caps: answer {pinned['max_answer_tokens']}, "
        f"per call {pinned['max_call_tokens'] or 'none'}; turn cap {pinned['max_student_turns']}",
        f"- policy: `{json.dumps(pinned['policy'])}`",
        (
            f"- re-check of the failures by {pinned['judge']['model']} (its own column; the accuracy "
            "is the rules')"
            if pinned.get("judge")
            else "- no re-check of the failures by a judge model"
        ),
        *(
            f"- data {name}: {d['items']} items from {d['source']}, sha256 {d['sha256']}"
            for name, d in pinned["data"].items()
        ),
        "",
        "Every pinned value:",
        "",
        "```json",
        json.dumps(pinned, indent=2),
        "```",
        "",
    ]
    return "\n".join(parts)


def pareto_plot(summary: dict[str, Any], path: Path) -> None:
    """One point per setting (averaged over data sets, named in the legend) and the random
    router's curve from the student alone to the teacher alone (averaged the same way)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ends = [
        (rows[STUDENT], rows[TEACHER])
        for rows in summary["datasets"].values()
        if STUDENT in rows and TEACHER in rows
    ]
    if ends:
        ps = [i / 50 for i in range(51)]
        xs = [sum(router_share(s, t, p) for s, t in ends) / len(ends) for p in ps]
        ys = [sum(router_accuracy(s, t, p) for s, t in ends) / len(ends) for p in ps]
        ax.plot([100 * x for x in xs], [100 * y for y in ys], "--", color="grey", label="random router")
    markers = "o^sDv<>PX*"
    for i, (setting, row) in enumerate(summary["settings"].items()):
        if "accuracy" in row and "teacher_share" in row:
            x, y = 100 * row["teacher_share"], 100 * row["accuracy"]
            ax.scatter([x], [y], marker=markers[i % len(markers)], s=50, zorder=3, label=setting)
    ax.set_xlabel("teacher-token share (%)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(out: Path, summary: dict[str, Any]) -> None:
    (out / "report.md").write_text(report_markdown(summary))
    pareto_plot(summary, out / "pareto.png")
