"""Model servers for relay-agents (vLLM OpenAI-compatible servers on loopback)."""

from .vllm import INSTALL_HINT, VLLMServer, VLLMServerError, default_log_dir, vllm_available

__all__ = [
    "INSTALL_HINT",
    "VLLMServer",
    "VLLMServerError",
    "default_log_dir",
    "vllm_available",
]
