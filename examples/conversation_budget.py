"""A multi-turn conversation: its messages persist in a LangGraph SQLite checkpointer and its
teacher budget (RELAY_BUDGET_MAX_TEACHER_TOKENS, ...) in the budget store, both keyed by the
thread_id.

Run it twice: the second run continues the same thread and sees what the first one spent.
"""

import sys

from langgraph.checkpoint.sqlite import SqliteSaver

from relay_agents import build_relay_graph, load_config

config = load_config()
path = sys.argv[1] if len(sys.argv) > 1 else "relay-conversations.sqlite"
with SqliteSaver.from_conn_string(path) as saver:
    graph = build_relay_graph(config, checkpointer=saver)
    thread = {"configurable": {"thread_id": "demo-conversation"}}
    for question in ("What is 12*34?", "And 408 + 19?"):
        state = graph.invoke({"messages": [{"role": "user", "content": question}]}, thread)
        reply = state["messages"][-1]
        budget = reply.response_metadata["relay"]["budget"]
        print(f"> {question}\n{reply.text}\n(teacher tokens spent so far: {budget['spent_teacher_tokens']})")
