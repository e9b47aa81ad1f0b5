"""Model backends, registered by name; built-ins go through the same table as any other."""

from __future__ import annotations

import importlib
import os
from typing import Any

from ..errors import ModelUnavailable
from .base import LLM, Chunk, Completion, GenerationRequest, Message, ToolCall, Usage

BACKENDS = {
    "openai": "interpreter.llm.openai:OpenAILLM",
    "transformers": "interpreter.llm.transformers:TransformersLLM",
}


DEFAULT_MODEL = "Qwen/Qwen-7B-Chat-Int4"


def llm_from_options(*, model: str | None = None, openai_base_url: str | None = None, openai_model: str | None = None,
                     openai_api_key: str | None = None, vision: bool = False) -> LLM:
    """The model every front end (CLI, server, benchmark) picks the same way: an OpenAI-compatible
    base URL given explicitly wins, then an explicit local ``model``, then ``OPENAI_BASE_URL`` from
    the environment, then the default local model through transformers."""
    base_url = openai_base_url or (None if model else os.environ.get("OPENAI_BASE_URL"))
    if base_url:
        return create_llm("openai", base_url=base_url, model=openai_model, api_key=openai_api_key,
                          supports_images=vision)
    return create_llm("transformers", model=model or DEFAULT_MODEL)


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


__all__ = ["BACKENDS", "DEFAULT_MODEL", "llm_from_options", "LLM", "Chunk", "Completion", "GenerationRequest", "Message", "ToolCall", "Usage", "create_llm"]
