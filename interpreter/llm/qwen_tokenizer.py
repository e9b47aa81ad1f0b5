"""Qwen v1's tokenizer, without the checkpoint's Python code.

Qwen v1 checkpoints ship their tokenizer as code (``tokenization_qwen.py``, loaded through
``trust_remote_code``) around one data file, ``qwen.tiktoken``: a byte-level BPE table, one
``<base64 token> <rank>`` a line. This module reads that file and builds the same tokenizer with
``tiktoken``: Qwen v1's pre-tokenizer pattern, the text normalized to NFC before encoding, and the
special tokens at their fixed ids right after the table (``<|endoftext|>``, ``<|im_start|>``,
``<|im_end|>``, then ``<|extra_0|>`` … ``<|extra_204|>``). Nothing is downloaded and no checkpoint
code runs.

It offers the part of a Hugging Face tokenizer's interface the transformers backend and its
streamer use (``__call__``, ``encode``, ``decode``, the end and padding ids), so both paths read it
alike. Special-token text inside a prompt is encoded as the special token, as the backend's prompt
formats write ChatML as text.
"""

from __future__ import annotations

import base64
import binascii
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from interpreter.errors import ModelUnavailable

VOCAB_FILE = "qwen.tiktoken"
# Qwen v1's pre-tokenizer: contractions, letters (with one leading non-letter), single digits,
# punctuation runs, newlines, spaces
PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
           r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIALS = (ENDOFTEXT, IM_START, IM_END, *(f"<|extra_{i}|>" for i in range(205)))
MAX_VOCAB_BYTES = 64 << 20  # Qwen v1's table is 2.5 MB; a larger file is not one


def read_ranks(path: Path) -> dict[bytes, int]:
    """The BPE table of a ``qwen.tiktoken`` file. Raises ``ModelUnavailable`` naming the line for a
    malformed file (ranks must be 0..n-1, each once, as tiktoken requires)."""
    try:
        if path.stat().st_size > MAX_VOCAB_BYTES:
            raise ModelUnavailable(f"{path} is over {MAX_VOCAB_BYTES >> 20} MB: not a Qwen v1 vocabulary.")
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise ModelUnavailable(f"Cannot read the tokenizer's vocabulary {path}: {exc.strerror or exc}.") from exc
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ModelUnavailable(f"{path}, line {number}: expected '<base64 token> <rank>'.") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ModelUnavailable(f"{path}: the ranks are not 0..{len(ranks) - 1}, each once.")
    return ranks


class QwenTokenizer:
    """Qwen v1's tiktoken tokenizer over a checkpoint's ``qwen.tiktoken``."""

    chat_template = None  # Qwen v1 has none: the backend writes ChatML itself
    bos_token_id = None

    def __init__(self, ranks: Mapping[bytes, int], name: str = "qwen") -> None:
        try:
            import tiktoken
        except ImportError as exc:
            raise ModelUnavailable("Qwen v1's tokenizer needs tiktoken: `pip install 'jupybox[local]'` "
                                   "(or `pip install tiktoken`).") from exc
        first = len(ranks)
        self.special_ids = {tok: first + i for i, tok in enumerate(SPECIALS)}
        self._encoding = tiktoken.Encoding(name, pat_str=PATTERN, mergeable_ranks=dict(ranks),
                                           special_tokens=self.special_ids)
        self._pieces = {rank: token for token, rank in ranks.items()}
        self._pieces.update({i: tok.encode() for tok, i in self.special_ids.items()})
        self.eos_token_id = self.pad_token_id = self.special_ids[ENDOFTEXT]

    @classmethod
    def from_folder(cls, folder: str | Path) -> QwenTokenizer:
        path = Path(folder) / VOCAB_FILE
        if not path.is_file():
            raise ModelUnavailable(f"{folder} is a Qwen v1 checkpoint without its {VOCAB_FILE}: copy the whole "
                                   "checkpoint folder.")
        return cls(read_ranks(path))

    def __len__(self) -> int:
        return len(self._pieces)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special-token text becomes the special token (Qwen v1 adds no BOS,
        so ``add_special_tokens`` changes nothing)."""
        return self._encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all", disallowed_special=())

    def decode(self, ids: Iterable[int] | Any, skip_special_tokens: bool = False, **_: Any) -> str:
        """Text of ``ids`` (a list or a tensor). Ids past the table (a model's padded vocabulary)
        decode to nothing; bytes that are not yet whole UTF-8 characters to U+FFFD."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        first_special = self.eos_token_id
        pieces = (self._pieces.get(int(i), b"") for i in ids if not (skip_special_tokens and int(i) >= first_special))
        return b"".join(pieces).decode("utf-8", errors="replace")

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.special_ids.get(token)

    def __call__(self, text: str, return_tensors: str | None = None, add_special_tokens: bool = True) -> dict[str, Any]:
        ids = self.encode(text)
        if return_tensors != "pt":
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        import torch

        tensor = torch.tensor([ids], dtype=torch.long)
        return {"input_ids": tensor, "attention_mask": torch.ones_like(tensor)}
