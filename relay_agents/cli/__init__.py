"""The ``relay-agents`` command line: one module per command, their shared options in ``common``.

The command modules import the relay itself when a command runs, not here, so that
``relay-agents --help`` answers without loading LangGraph, LangChain or OpenAI.
"""

from __future__ import annotations

import typer

from relay_agents.cli.ask import ask
from relay_agents.cli.calibrate import calibrate
from relay_agents.cli.demo import demo
from relay_agents.cli.eval import eval_command
from relay_agents.cli.serve import serve
from relay_agents.cli.train import train
from relay_agents.cli.tutor import tutor

app = typer.Typer(help="Relay decoding: a small student model calls a large teacher for hard steps.")
app.command()(ask)
app.command()(demo)
app.command()(serve)
app.command()(tutor)
app.command()(calibrate)
app.command(name="eval")(eval_command)
app.add_typer(train, name="train")

__all__ = ["app"]
