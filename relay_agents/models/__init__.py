"""Off-the-shelf models prepared for serving with vLLM (no Hugging Face hub needed)."""

from .smollm2 import SmolLM2Error, smollm2_dir

__all__ = ["SmolLM2Error", "smollm2_dir"]
