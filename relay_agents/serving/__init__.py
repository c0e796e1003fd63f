"""Model servers for relay-agents (vLLM OpenAI-compatible servers on loopback)."""

from .vllm import (
    INSTALL_HINT,
    TinyPairServers,
    VLLMServer,
    VLLMServerError,
    start_tiny_pair,
    tiny_pair_servers,
    vllm_available,
)

__all__ = [
    "INSTALL_HINT",
    "TinyPairServers",
    "VLLMServer",
    "VLLMServerError",
    "start_tiny_pair",
    "tiny_pair_servers",
    "vllm_available",
]
