"""The pure core of relay decoding: types, the protocol, call policies, grants and the answer
state machine. Plain data in, plain data out: nothing here does I/O or imports a client,
a web framework or LangGraph (checked by import-linter), so every transport, graph and
server shares one definition of what a relay does."""
