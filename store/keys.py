"""API keys: made with ``secrets``, recognisable by their ``jbx_`` prefix, stored only as a
SHA-256 digest. A key carries 256 random bits, so a fast hash is enough (nobody can guess a
preimage); a slow password hash would only cost every request time."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

KEY_PREFIX = "jbx_"
KEY_BYTES = 32
# What a key looks like anywhere in text: logs and audit lines are scrubbed of this shape.
KEY_PATTERN = re.compile(r"jbx_[A-Za-z0-9_-]{16,}")
KEY_MAX_CHARS = 512  # a credential longer than this is refused before it is hashed


def new_key() -> str:
    """A fresh key: the prefix and 43 URL-safe characters (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def key_digest(key: str) -> str:
    """The hex SHA-256 of a key: what the store keeps instead of the key."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def same_digest(a: str, b: str) -> bool:
    """Constant-time equality of two digests (or tokens)."""
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


def redact_keys(text: str) -> str:
    """``text`` with every key-shaped run replaced by ``jbx_[redacted]``."""
    return KEY_PATTERN.sub(KEY_PREFIX + "[redacted]", text)
