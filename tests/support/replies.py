"""Replies the scripted model is given: prose and one fenced Python cell, as models write them."""

from __future__ import annotations


def code_reply(code: str) -> str:
    """A reply that runs ``code`` (the OpenAI endpoint's tests quote its prose)."""
    return f"Let me compute that.\n```python\n{code}\n```"


def fenced(code: str) -> str:
    """A reply that runs ``code`` while looking at data (the browser UI's tests)."""
    return f"Let me look at the data.\n```python\n{code}\n```"
