"""Model backends, registered by name; built-ins go through the same table as any other."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, fields
from typing import Any

from ..errors import ModelUnavailable
from .base import (LLM, Chunk, Completion, GenerationOptions, GenerationRequest, Message, StreamStats, ToolCall, Usage,
                   model_family)

BACKENDS = {
    "openai": "interpreter.llm.openai:OpenAILLM",
    "transformers": "interpreter.llm.transformers:TransformersLLM",
}


DEFAULT_MODEL = "Qwen/Qwen-7B-Chat-Int4"
MAX_STREAMS = 32  # the most generations one decode step of the fast path takes


@dataclass
class ModelSettings:
    """Which model, for every front end (terminal, server, benchmark): read from flags and the
    environment here and nowhere else (``JUPYBOX_MODEL``, ``JUPYBOX_TRUST_REMOTE_CODE``, ``JUPYBOX_MAX_CONTEXT``,
    ``JUPYBOX_MAX_STREAMS``, ``OPENAI_BASE_URL``, ``OPENAI_MODEL``, ``OPENAI_API_KEY``)."""

    model: str | None = None  # a transformers checkpoint folder or hub id
    openai_base_url: str | None = None
    openai_model: str | None = None
    openai_api_key: str | None = None
    vision: bool = False  # the model accepts images: plots go to it as image parts
    format: str | None = None  # react | fenced | tools; None: the backend's and model's default
    # let transformers import a checkpoint's own Python files (families it does not know); never
    # needed for Qwen v1, which jupybox serves with its own code
    trust_remote_code: bool = False
    max_context: int | None = None  # a local model's prompt and reply together (default: its own, at most 8192)
    max_streams: int | None = None  # a local model's generations decoded together on the fast path (default 16)

    @classmethod
    def from_env(cls, **flags: Any) -> ModelSettings:
        """Flags win over the environment; an explicit local ``model`` beats ``OPENAI_BASE_URL``."""
        env = os.environ
        values: dict[str, Any] = {"model": env.get("JUPYBOX_MODEL") or None,
                                  "openai_base_url": env.get("OPENAI_BASE_URL") or None,
                                  "openai_model": env.get("OPENAI_MODEL") or None,
                                  "openai_api_key": env.get("OPENAI_API_KEY") or None,
                                  "trust_remote_code": env.get("JUPYBOX_TRUST_REMOTE_CODE") == "1",
                                  "max_context": _positive(env.get("JUPYBOX_MAX_CONTEXT"), "JUPYBOX_MAX_CONTEXT"),
                                  "max_streams": _streams(env.get("JUPYBOX_MAX_STREAMS"))}
        values.update({k: v for k, v in flags.items() if v is not None})
        if flags.get("model") and not flags.get("openai_base_url"):
            values["openai_base_url"] = None
        return cls(**values)

    @classmethod
    def from_args(cls, args: Any) -> ModelSettings:
        """From the command line's model flags (any object with those attributes), then the environment."""
        flags = {f.name: getattr(args, f.name, None) for f in fields(cls)}
        for switch in ("vision", "trust_remote_code"):
            flags[switch] = flags[switch] or None  # a flag left off leaves the environment's say
        return cls.from_env(**flags)

    @property
    def configured(self) -> bool:
        """Whether a model was asked for (else the default local one is only a suggestion)."""
        return self.remote or self.model is not None

    @property
    def remote(self) -> bool:
        return self.openai_base_url is not None

    @property
    def name(self) -> str:
        """The model as a person would name it."""
        return (self.openai_model or "") if self.remote else (self.model or DEFAULT_MODEL)

    def backend_class(self) -> type[LLM]:
        return backend_class("openai" if self.remote else "transformers")

    def create(self) -> LLM:
        """The backend instance (a local model is loaded by its ``load()``, not here)."""
        if self.remote:
            return create_llm("openai", base_url=self.openai_base_url, model=self.openai_model,
                              api_key=self.openai_api_key, supports_images=self.vision)
        return create_llm("transformers", model=self.model or DEFAULT_MODEL, trust_remote_code=self.trust_remote_code,
                          max_context=self.max_context, max_streams=self.max_streams)


def _positive(value: str | None, name: str) -> int | None:
    if not value:
        return None
    if not value.isdigit() or int(value) < 16:
        raise ModelUnavailable(f"{name}={value!r}: give a number of tokens, at least 16.")
    return int(value)


def _streams(value: str | None) -> int | None:
    if not value:
        return None
    if not value.isdigit() or not 1 <= int(value) <= MAX_STREAMS:
        raise ModelUnavailable(f"JUPYBOX_MAX_STREAMS={value!r}: give a number of streams from 1 to {MAX_STREAMS}.")
    return int(value)


def backend_class(backend: str) -> type[LLM]:
    try:
        module, cls = BACKENDS[backend].split(":")
    except KeyError:
        raise ModelUnavailable(f"unknown model backend {backend!r}: choose one of {', '.join(BACKENDS)}") from None
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise ModelUnavailable(
            f"the {backend} backend cannot be imported ({exc}): install its extra, e.g. "
            f"`pip install 'jupybox[local]'` for transformers"
        ) from None


def create_llm(backend: str, **options: Any) -> LLM:
    return backend_class(backend)(**options)


__all__ = ["BACKENDS", "DEFAULT_MODEL", "LLM", "MAX_STREAMS", "Chunk", "Completion", "GenerationOptions", "GenerationRequest",
           "Message", "ModelSettings", "StreamStats", "ToolCall", "Usage", "backend_class", "create_llm", "model_family"]
