"""The settings an evaluation compares, one row each, and the configs that run them.

* ``relay``: the configured relay (its own policy).
* ``student``: the student alone. With a separate student-alone model (the student before relay
  training, as in the RelayLLM paper's table) that model; otherwise the configured student with
  no teacher and nothing blocked: a command it writes is declined and it carries on.
* ``teacher``: the teacher alone (it writes the whole answer).
* ``teacher-free``: the relay with calls blocked in decoding (the published teacher-free row).
* ``interval``, ``random``: token-level calling policies whose knob (interval, rate) is calibrated
  to the relay's measured teacher-token share, on the student-alone model when there is one
  (the question they answer: does a student never trained to call, with the teacher at fixed or
  random points, do as well at the same teacher budget?), else on the relay's student.
* ``random-router@cost``, ``random-router@accuracy``: a query-level router that sends a random
  fraction of the questions to the teacher alone and the rest to the student alone, at the
  relay's teacher-token share and at the relay's accuracy. Computed from the ``student`` and
  ``teacher`` rows' per-item results (no requests of their own).
"""

from __future__ import annotations

from relay_agents.core.config import Endpoint, RelayConfig
from relay_agents.core.policies import IntervalPolicy, RandomPolicy, TeacherFreePolicy, TeacherOnlyPolicy

RELAY, STUDENT, TEACHER, TEACHER_FREE = "relay", "student", "teacher", "teacher-free"
INTERVAL, RANDOM = "interval", "random"
ROUTER_COST, ROUTER_ACCURACY = "random-router@cost", "random-router@accuracy"

#: Every setting, in the order the rows are reported.
SETTINGS = (RELAY, STUDENT, TEACHER, TEACHER_FREE, INTERVAL, RANDOM, ROUTER_COST, ROUTER_ACCURACY)
#: Settings that send requests on their own.
DIRECT = (RELAY, STUDENT, TEACHER, TEACHER_FREE)
#: Settings calibrated to the relay's teacher-token share.
MATCHED = (INTERVAL, RANDOM)
#: Settings computed from the student-alone and teacher-alone rows.
ROUTERS = (ROUTER_COST, ROUTER_ACCURACY)

#: Calibration grids: (knob values, whether the knob is an integer).
GRIDS: dict[str, tuple[tuple[float, ...], bool]] = {
    INTERVAL: ((4, 8, 16, 32, 64, 128), True),
    RANDOM: ((0.005, 0.01, 0.02, 0.05, 0.1, 0.2), False),
}


def parse_settings(names: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The settings named (comma-separated or a list), in report order, plus the rows they need
    (``relay`` for the matched policies and the routers' targets, ``student`` and ``teacher``
    for the routers); ValueError for an unknown name."""
    wanted = {n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()}
    unknown = wanted - set(SETTINGS)
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}; known: {', '.join(SETTINGS)}")
    if wanted & {*MATCHED, *ROUTERS}:
        wanted.add(RELAY)
    if wanted & set(ROUTERS):
        wanted |= {STUDENT, TEACHER}
    return tuple(s for s in SETTINGS if s in wanted)


def setting_config(
    setting: str, config: RelayConfig, *, student_alone: Endpoint | None = None, knob: float | None = None
) -> RelayConfig:
    """The config that runs ``setting`` (a direct or matched one); ``knob`` is the calibrated
    interval or rate of a matched setting."""
    if setting == RELAY:
        return config
    if setting == STUDENT:
        student = student_alone or config.student.model_copy(update={"call_suppression": "none"})
        return config.model_copy(update={"student": student, "policy": TeacherFreePolicy()})
    if setting == TEACHER:
        return config.model_copy(update={"policy": TeacherOnlyPolicy()})
    if setting == TEACHER_FREE:
        return config.model_copy(update={"policy": TeacherFreePolicy()})
    if knob is None:
        raise ValueError(f"{setting} needs its calibrated knob")
    student = student_alone or config.student
    if setting == INTERVAL:
        return config.model_copy(update={"student": student, "policy": IntervalPolicy(every=int(knob))})
    if setting == RANDOM:
        return config.model_copy(update={"student": student, "policy": RandomPolicy(rate=knob, seed=0)})
    raise ValueError(f"{setting} sends no requests of its own")
