"""The command line's flags for the model and the turn, shared by ``jupybox serve``, ``ask``,
``chat``, ``mcp`` and ``eval``, and the settings they make: one definition, so that every command
spells and defaults them alike (the defaults are the settings' own)."""

from __future__ import annotations

import argparse

from interpreter import InterpreterSettings
from interpreter.llm import DEFAULT_MODEL, MAX_STREAMS

DEFAULTS = InterpreterSettings()


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The model and the turn's flags; ``ModelSettings.from_args`` and ``interpreter_settings`` read them."""
    p.add_argument("--model", help=f"local checkpoint folder or hub id for the transformers backend (default {DEFAULT_MODEL})")
    p.add_argument("--openai-base-url", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (env OPENAI_BASE_URL)")
    p.add_argument("--openai-model", help="model name on that server (env OPENAI_MODEL)")
    p.add_argument("--openai-api-key", help="API key (env OPENAI_API_KEY)")
    p.add_argument("--max-context", type=_context_tokens, metavar="TOKENS",
                   help="a local model's prompt and reply together, in tokens (default: the checkpoint's, at most 8192; "
                        "env JUPYBOX_MAX_CONTEXT); longer conversations drop their oldest turns")
    p.add_argument("--max-streams", type=_streams, metavar="N",
                   help=f"a local model's generations decoded together on the fast path (default 16, at most {MAX_STREAMS}, "
                        "fewer where the GPU's memory holds fewer; env JUPYBOX_MAX_STREAMS); more wait their turn")
    p.add_argument("--vision", action="store_true", help="the model accepts images: send plots as image parts")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let a local checkpoint's own Python files run in this process (families transformers does "
                        "not know; they run as the server, outside the sandbox; env JUPYBOX_TRUST_REMOTE_CODE=1). "
                        "Qwen v1 never needs it")
    p.add_argument("--format", choices=["react", "fenced", "tools"], help="how code is asked for (default: per model)")
    p.add_argument("--max-executions", type=int, default=DEFAULTS.max_executions, help="code executions per turn")
    p.add_argument("--timeout", type=float, default=DEFAULTS.execution_timeout, help="seconds per execution")
    p.add_argument("--temperature", type=float, default=DEFAULTS.temperature)
    p.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_tokens, help="new tokens per generation")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)


def _context_tokens(text: str) -> int:
    if not text.isdigit() or int(text) < 16:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of tokens of at least 16")
    return int(text)


def _streams(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_STREAMS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of streams from 1 to {MAX_STREAMS}")
    return int(text)


def interpreter_settings(args: argparse.Namespace) -> InterpreterSettings:
    """The turn's bounds and sampling from the flags ``add_model_flags`` added."""
    return InterpreterSettings(max_executions=args.max_executions, execution_timeout=args.timeout,
                               temperature=args.temperature, max_tokens=args.max_new_tokens, seed=args.seed)


__all__ = ["add_model_flags", "interpreter_settings"]
