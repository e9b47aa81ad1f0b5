"""Errors the user store and the audit log raise, each a sentence with a next step::

    StoreError
    ├── StoreUnavailable        the store file cannot be used
    │   ├── StoreLocked         another process held it past the busy timeout
    │   └── StoreCorrupt        the file is not a jupybox user store (or is damaged)
    ├── InvalidUserName         a name with characters the store does not accept
    ├── InvalidLimit            a quota below 1
    ├── UserExists              ``users add`` of a name already taken
    └── UserNotFound            a name the store does not hold

``store/`` sits below every other package and imports none of them, so its errors are their own
tree; the command line and the server translate them at their edge (an exit status, a 4xx/503).
``sqlite3`` exceptions never leave this package.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error the store raises on purpose."""


class StoreUnavailable(StoreError):
    """The store file cannot be read or written (permissions, disk, a removed file)."""


class StoreLocked(StoreUnavailable):
    """Another process kept the store locked for longer than the busy timeout."""


class StoreCorrupt(StoreUnavailable):
    """The file is not a jupybox user store, or SQLite found it damaged."""


class InvalidUserName(StoreError, ValueError):
    """A user name with characters, or a length, the store does not accept."""


class InvalidLimit(StoreError, ValueError):
    """A per-user quota that is not a positive number."""


class UserExists(StoreError):
    """A user of that name is already in the store."""


class UserNotFound(StoreError):
    """No user of that name is in the store."""
