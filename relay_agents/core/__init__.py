"""The pure core: the relay's models, protocol and decisions, with no I/O (network, files, environment)."""
