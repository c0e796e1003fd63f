"""The tutor in a terminal (``relay-agents tutor --cli``): the page's conversations, budget
and notices, printed with rich. Reads one line per question; commands start with ``/``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from relay_agents.core.config import RelayConfig
from relay_agents.tutor.service import (
    ConversationBusy,
    Tutor,
    TutorInputError,
    TutorOptions,
    UnknownConversation,
)
from relay_agents.tutor.views import BUDGET_SPENT, budget_line, usage_line

STYLES = {"student": "", "teacher": "bold magenta", "mixed": "bold magenta"}
NOTICE_STYLES = {"budget": "yellow", "teacher": "red", "info": "cyan"}
HELP = (
    "Type a question and press Enter. Commands: /new (new conversation), /list, /open N, "
    "/retry (the last unanswered question), /budget, /help, /quit."
)


class TerminalTutor:
    """One terminal session over a :class:`Tutor`."""

    def __init__(self, tutor: Tutor, console: Console, read: Callable[[str], str]) -> None:
        self.tutor = tutor
        self.console = console
        self.read = read
        self.current: str | None = None

    async def run(self, conversation_id: str | None = None) -> None:
        info = self.tutor.options
        world = f"{info.world}: " if info.world else ""
        self.console.print(
            f"[bold]Math tutor[/bold] (relay decoding), {world}student {self.tutor.config.student.model}, "
            f"teacher {self.tutor.config.teacher.model}. "
            f"[{STYLES['teacher']}]Teacher text is highlighted.[/{STYLES['teacher']}]"
        )
        self.console.print(f"[dim]{HELP}[/dim]")
        if conversation_id is not None:
            await self.open(conversation_id)
        else:
            await self.new()
        while True:
            try:
                line = await asyncio.to_thread(self.read, "you> ")
            except (EOFError, KeyboardInterrupt):
                self.console.print()
                return
            if not await self.handle(line):
                return

    async def handle(self, line: str) -> bool:
        """Act on one line; False ends the session."""
        command, _, arg = line.strip().partition(" ")
        try:
            if command in ("/quit", "/exit"):
                return False
            if command == "/help":
                self.console.print(HELP)
            elif command == "/new":
                await self.new()
            elif command == "/list":
                await self.list()
            elif command == "/open":
                await self.open_numbered(arg.strip())
            elif command == "/budget":
                self.print_budget(await self.tutor.budget(self._current()))
            elif command == "/retry":
                await self.show_answer(self.tutor.retry(self._current()))
            elif command.startswith("/"):
                self.console.print(f"[red]Unknown command {command}.[/red] {HELP}")
            else:
                await self.show_answer(self.tutor.ask(self._current(), line))
        except (TutorInputError, ConversationBusy, UnknownConversation) as exc:
            self.console.print(f"[red]{exc}[/red]")
        return True

    def _current(self) -> str:
        assert self.current is not None
        return self.current

    async def new(self) -> None:
        conversation = await self.tutor.new_conversation()
        self.current = conversation["id"]
        self.console.rule(f"new conversation {conversation['id']}")
        self.print_budget(await self.tutor.budget(conversation["id"]))

    async def list(self) -> None:
        for n, c in enumerate(await self.tutor.conversations(), 1):
            mark = "*" if c["id"] == self.current else " "
            self.console.print(f"{mark}{n:>3}. {c['title'] or '(empty)'}  [dim]{c['id']}[/dim]")

    async def open_numbered(self, which: str) -> None:
        conversations = await self.tutor.conversations()
        if which.isdigit() and 1 <= int(which) <= len(conversations):
            await self.open(conversations[int(which) - 1]["id"])
        elif any(c["id"] == which for c in conversations):
            await self.open(which)
        else:
            self.console.print(f"[red]No conversation {which!r}:[/red] /list shows them.")

    async def open(self, conversation_id: str) -> None:
        conversation = await self.tutor.conversation(conversation_id)
        self.current = conversation_id
        self.console.rule(conversation["title"] or f"conversation {conversation_id}")
        for message in conversation["messages"]:
            if message["role"] == "user":
                self.console.print(Text("you> ", style="bold") + Text(message["text"]))
                if not message["answered"]:
                    self.console.print("[red](not answered; /retry asks again)[/red]")
            else:
                self.print_answer(message)
        self.print_budget(conversation["budget"])

    def print_answer(self, message: dict[str, Any]) -> None:
        text = Text()
        for span in message["spans"]:
            text.append(span["text"], style=STYLES[span["source"]])
        self.console.print(text)
        self.print_footer(message)

    def print_footer(self, message: dict[str, Any]) -> None:
        if message.get("usage"):
            self.console.print(f"[dim]{usage_line(message['usage'])}[/dim]")
        for n in message.get("notices", []):
            self.console.print(Text(n["text"], style=NOTICE_STYLES[n["kind"]]))

    def print_budget(self, meter: dict[str, Any]) -> None:
        self.console.print(f"[dim]{budget_line(meter)}[/dim]")
        if meter["exhausted"]:
            self.console.print(Text(BUDGET_SPENT, style="bold yellow"))

    async def show_answer(self, events: Any) -> None:
        async for event in events:
            if event["type"] == "delta":
                self.console.print(event["text"], style=STYLES[event["source"]], end="")
            elif event["type"] == "done":
                self.console.print()
                self.print_footer(event["message"])
                self.print_budget(event["budget"])
            elif event["type"] == "error":
                self.console.print()
                self.console.print(Text(event["message"], style="bold red"))
                self.console.print("[dim](/retry asks again)[/dim]")


async def run_terminal(
    config: RelayConfig,
    options: TutorOptions | None = None,
    db_path: Path | None = None,
    conversation_id: str | None = None,
    console: Console | None = None,
) -> None:
    """Run the terminal tutor until ``/quit`` or end of input."""
    console = console or Console(highlight=False)
    async with Tutor.open(config, db_path, options) as tutor:
        await TerminalTutor(tutor, console, console.input).run(conversation_id)
