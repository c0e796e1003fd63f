"""``relay-agents train grpo``: GRPO with real relay rollouts from a ``train.toml``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from relay_agents.cli.common import console, fail


def grpo(
    config: Annotated[Path, typer.Option("--config", "-c", help="train.toml (docs/training.md).")],
    max_steps: Annotated[int | None, typer.Option(help="Overrides max_steps of the grpo table.")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Overrides output_dir of the grpo table.")] = None,
) -> None:
    """Train the student with GRPO; every rollout is a relay through the teacher endpoint."""
    from relay_agents.settings import ConfigError
    from relay_agents.train.grpo import load_grpo_settings, train_grpo

    try:
        settings = load_grpo_settings(config)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    overrides: dict[str, object] = {}
    if max_steps is not None:
        overrides["max_steps"] = max_steps
    if output_dir is not None:
        overrides["output_dir"] = str(output_dir)
    saved = train_grpo(settings, **overrides)
    console.print(f"saved the trained student in {saved}")
