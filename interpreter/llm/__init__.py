"""Model backends, registered by name; built-ins go through the same table as any other."""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import ModelUnavailable
from .base import LLM, Chunk, Completion, GenerationRequest, Message, ToolCall, Usage

BACKENDS = {
    "openai": "interpreter.llm.openai:OpenAILLM",
    "transformers": "interpreter.llm.transformers:TransformersLLM",
}


def create_llm(backend: str, **options: Any) -> LLM:
    try:
        module, cls = BACKENDS[backend].split(":")
    except KeyError:
        raise ModelUnavailable(f"unknown model backend {backend!r}: choose one of {', '.join(BACKENDS)}") from None
    try:
        impl = getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise ModelUnavailable(
            f"the {backend} backend cannot be imported ({exc}): install its extra, e.g. "
            f"`pip install 'jupybox[local]'` for transformers"
        ) from None
    return impl(**options)


__all__ = ["BACKENDS", "LLM", "Chunk", "Completion", "GenerationRequest", "Message", "ToolCall", "Usage", "create_llm"]
