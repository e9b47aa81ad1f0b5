"""Who may use a server, and what they did: users and their keys (``UserStore``, a SQLite file
under ``JUPYBOX_HOME``), the server's view of them (``KeyIndex``) and the audit log
(``AuditLog``, JSON lines).

The lowest layer of the tree: it imports nothing from ``sandbox``, ``interpreter``, ``ui`` or
``bench``, and everything above may use it.
"""

from .audit import AUDIT_FILE, AuditEvent, AuditLog, audit_path
from .errors import (
    InvalidLimit,
    InvalidUserName,
    StoreCorrupt,
    StoreError,
    StoreLocked,
    StoreUnavailable,
    UserExists,
    UserNotFound,
)
from .home import default_home
from .keys import KEY_MAX_CHARS, KEY_PATTERN, KEY_PREFIX, key_digest, new_key, redact_keys
from .sessions import PAUSED, RUNNING, SessionRecord, SessionRecords
from .users import STORE_FILE, KeyIndex, User, UserStore, check_name

__all__ = [
    "AUDIT_FILE", "AuditEvent", "AuditLog", "InvalidLimit", "InvalidUserName", "KEY_MAX_CHARS", "KEY_PATTERN",
    "KEY_PREFIX", "KeyIndex", "PAUSED", "RUNNING", "STORE_FILE", "SessionRecord", "SessionRecords", "StoreCorrupt", "StoreError", "StoreLocked", "StoreUnavailable",
    "User", "UserExists", "UserNotFound", "UserStore", "audit_path", "check_name", "default_home", "key_digest",
    "new_key", "redact_keys",
]
