"""The tiny world's shared byte-level BPE tokenizer (student and teacher use the same).

* Qwen2-style pre-tokenizer: digits are split into single tokens, a space before a
  digit is its own token, so `` 282`` is always 4 tokens.
* A normalizer collapses runs of spaces to one: the relay protocol's teacher view
  replaces each answered ``<call>N</call>`` by a space, which would otherwise put a
  double space before earlier teacher results.
* ChatML chat template; ``<|im_start|>``, ``<|im_end|>`` (eos) and ``<|endoftext|>``
  (pad) are special; ``<call>`` and ``</call>`` are ORDINARY added tokens, so that
  vLLM's stop strings and ``include_stop_str_in_output`` see them in the text.

Needs only the ``tokenizers`` package.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

TOKENIZER_VERSION = 1
VOCAB_SIZE = 384

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
CALL_TOKENS = ("<call>", "</call>")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen2's pre-tokenizer pattern: single digits, words with one leading non-letter.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def render_chat(messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
    """Render ``messages`` as :data:`CHAT_TEMPLATE` does (without jinja)."""
    out = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    if add_generation_prompt:
        out += f"{IM_START}assistant\n"
    return out


def train_tokenizer(
    corpus: Iterable[str], vocab_size: int = VOCAB_SIZE, *, ordinary_tokens: Sequence[str] = CALL_TOKENS
):
    """Train the byte-level BPE tokenizer on ``corpus`` (deterministic for a given corpus);
    ``ordinary_tokens`` are added whole but not special (a variant's markup, such as tool calls)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ordinary_tokens])
    return tok


def save_tokenizer(
    tok,
    directory: str | Path,
    *,
    model_max_length: int = 512,
    chat_template: str = CHAT_TEMPLATE,
    ordinary_tokens: Sequence[str] = CALL_TOKENS,
) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``
    (a variant passes its own chat template and the ordinary tokens it trained with)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    added = {}
    for t in (*SPECIAL_TOKENS, *ordinary_tokens):
        added[str(tok.token_to_id(t))] = {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in SPECIAL_TOKENS,
        }
    config = {
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": model_max_length,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {
        "additional_special_tokens": [IM_START, IM_END],
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
    }
    (d / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def load_tokenizer(directory: str | Path):
    """Load the ``tokenizers.Tokenizer`` saved in ``directory``."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))


def tokenizer_corpus(problems) -> list[str]:
    """Training texts for the tokenizer: chat-rendered prompts with both solution styles."""
    from .tasks import student_solution, teacher_solution

    texts = []
    for p in problems:
        prompt = render_chat([{"role": "user", "content": p.user_message}])
        texts.append(prompt + teacher_solution(p) + IM_END)
        texts.append(prompt + student_solution(p) + IM_END)
    return texts
