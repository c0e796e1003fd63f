"""Student replicas (``Endpoint.replica_urls``): each conversation stays on one replica turn
after turn, conversations spread over the replicas, and when one replica dies its
conversations move to the others while the rest stay where they were."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from relay_agents import Endpoint, abatch_relay, arelay
from relay_agents.clients import affinity_key
from relay_agents.core.types import Request
from relay_agents.testing import ScriptedServer
from tests.conftest import relay_config

CONVERSATIONS = 9


@pytest.fixture
def replicas() -> Iterator[list[ScriptedServer]]:
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(ScriptedServer()) for _ in range(3)]
        for server in servers:
            server.script("student", "Q-replica", ["An answer."], repeat=True)
        yield servers


def served_by(replicas: list[ScriptedServer], marker: str) -> list[int]:
    """Which replica answered each student prompt that holds ``marker``, in order (a batched
    request carries a list of prompts)."""
    return [
        i
        for i, server in enumerate(replicas)
        if server.running
        for request in server.requests()
        if request["model"] == "student"
        for prompt in (request["prompt"] if isinstance(request["prompt"], list) else [request["prompt"]])
        if marker in prompt
    ]


async def turns(config: object, conversation: int, count: int) -> None:
    messages: list[dict[str, str]] = [{"role": "system", "content": "One system prompt for all."}]
    for turn in range(count):
        messages.append({"role": "user", "content": f"Q-replica {conversation}/{turn}: and then?"})
        result = await arelay(messages, config, conversation_id=f"replica-{conversation}")  # type: ignore[arg-type]
        assert result.text == "An answer."
        messages.append({"role": "assistant", "content": result.text})


async def test_a_conversation_stays_on_its_replica_and_moves_when_it_dies(
    scripted: ScriptedServer, replicas: list[ScriptedServer]
) -> None:
    config = relay_config(
        scripted,
        student={
            "base_url": replicas[0].base_url,
            "replica_urls": [r.base_url for r in replicas[1:]],
            "max_retries": 0,
        },
    )
    for conversation in range(CONVERSATIONS):
        await turns(config, conversation, 2)
    home = {}
    for conversation in range(CONVERSATIONS):
        seen = served_by(replicas, f"Q-replica {conversation}/0")
        assert len(seen) == 2 and len(set(seen)) == 1, seen  # both turns' requests on one replica
        home[conversation] = seen[0]
    assert len(set(home.values())) >= 2, home  # the conversations spread over the replicas

    dead = home[0]
    replicas[dead].stop()
    for conversation in range(CONVERSATIONS):
        for server in replicas:
            if server.running:
                server.reset()
                server.script("student", "Q-replica", ["An answer."], repeat=True)
        await turns(config, conversation, 3)  # the same conversation id again
        seen = served_by(replicas, f"Q-replica {conversation}/0")
        assert len(seen) == 3 and len(set(seen)) == 1, seen
        if home[conversation] == dead:
            assert seen[0] != dead  # moved to a live replica, every turn on that one
        else:
            assert seen[0] == home[conversation]  # the others stay where their cache is


def test_the_affinity_key_is_the_conversation_else_the_opening_up_to_the_first_question() -> None:
    def request(*messages: dict[str, str], affinity: str | None = None) -> Request:
        return Request(messages=list(messages), answer="", max_tokens=1, affinity=affinity)

    system, q1 = {"role": "system", "content": "s"}, {"role": "user", "content": "q1"}
    later = [{"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    assert affinity_key(request(system, q1)) == affinity_key(request(system, q1, *later))
    assert affinity_key(request(system, q1)) != affinity_key(
        request(system, {"role": "user", "content": "q"})
    )
    assert affinity_key(request(q1, affinity="c")) == affinity_key(request(system, affinity="c"))


def test_replica_urls_come_as_a_list_or_comma_separated() -> None:
    listed = Endpoint(base_url="http://a/v1", model="m", replica_urls=["http://b/v1/", "http://c/v1"])
    separated = Endpoint.model_validate(
        {"base_url": "http://a/v1", "model": "m", "replica_urls": "http://b/v1/, http://c/v1"}
    )
    assert listed.replica_urls == separated.replica_urls == ("http://b/v1", "http://c/v1")


async def test_the_batch_path_keeps_each_conversation_on_its_replica_and_fails_over(
    scripted: ScriptedServer, replicas: list[ScriptedServer]
) -> None:
    config = relay_config(
        scripted,
        student={
            "base_url": replicas[0].base_url,
            "replica_urls": [r.base_url for r in replicas[1:]],
            "max_retries": 0,
        },
    )
    ids = [f"replica-{c}" for c in range(CONVERSATIONS)]
    questions = [f"Q-replica {c}/0: and then?" for c in range(CONVERSATIONS)]
    results = await abatch_relay(questions, config, conversation_ids=ids)
    assert [r.text for r in results] == ["An answer."] * CONVERSATIONS  # type: ignore[union-attr]
    home = {}
    for conversation in range(CONVERSATIONS):
        seen = served_by(replicas, f"Q-replica {conversation}/0")
        assert len(seen) == 1, seen
        home[conversation] = seen[0]
    assert len(set(home.values())) >= 2, home  # the same ranking as arelay's: spread over replicas
    for conversation in range(CONVERSATIONS):  # and the same replica arelay picks
        await turns(config, conversation, 1)
        assert served_by(replicas, f"Q-replica {conversation}/0")[-1] == home[conversation]

    dead = home[0]
    replicas[dead].stop()
    for server in replicas:
        if server.running:
            server.reset()
            server.script("student", "Q-replica", ["An answer."], repeat=True)
    results = await abatch_relay(questions, config, conversation_ids=ids)
    assert [r.text for r in results] == ["An answer."] * CONVERSATIONS  # type: ignore[union-attr]
    for conversation in range(CONVERSATIONS):
        seen = served_by(replicas, f"Q-replica {conversation}/0")
        assert len(seen) == 1 and seen[0] != dead, seen
        if home[conversation] != dead:
            assert seen[0] == home[conversation]
