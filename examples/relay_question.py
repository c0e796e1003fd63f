"""Relay one question and stream it, teacher text in brackets.

    RELAY_STUDENT_BASE_URL=... RELAY_STUDENT_MODEL=... \
    RELAY_TEACHER_BASE_URL=... RELAY_TEACHER_MODEL=... python examples/relay_question.py "What is 17*23?"
"""

import asyncio
import sys

from relay_agents import astream_relay, load_config


async def main(question: str) -> None:
    stream = astream_relay(question, load_config())
    source = "student"
    async for delta in stream:
        if delta.source != source:
            print("[" if delta.source == "teacher" else "]", end="")
            source = delta.source
        print(delta.text, end="", flush=True)
    if source == "teacher":
        print("]", end="")
    result = stream.result
    assert result is not None
    print(f"\n\nteacher share {result.usage.call_ratio:.1%}, finish: {result.finish_reason}")
    for event in result.events:
        print("note:", event)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "What is 17*23 + 5?"))
