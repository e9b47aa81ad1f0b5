"""Token counting for OpenAI-compatible servers, offline.

The encodings are tiktoken's (cl100k_base, o200k_base), taken from ``bpe-openai``, which ships the
tables inside the package: tiktoken itself fetches them from the internet on first use, which a
self-hosted deployment may not allow. The last resort is one token per three bytes, which
over-counts and so keeps budgets safe.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=8)
def token_counter(model: str = "") -> Callable[[str], int]:
    name = "o200k_base" if any(k in model.lower() for k in ("gpt-4o", "gpt-4.1", "gpt-5", "o1", "o3", "o4")) else "cl100k_base"
    try:
        import bpe_openai

        enc = bpe_openai.get_encoding(name)
        return lambda text: len(enc.encode(text))
    except Exception:  # not installed or unknown encoding
        log.warning("no tokenizer for %s: token budgets are estimated", name)
        return lambda text: len(text.encode()) // 3 + 1
