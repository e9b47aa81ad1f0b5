"""A page user's earlier conversations, where sessions outlive their tabs (durable sessions): what
the page lists, which one a loading page reopens, how one is taken into a tab, and deleted.

Every session id here comes from the browser, so none is trusted: it must look like a session id,
be one of the user's own (an admin's page lists their own work too, not everyone's), and the
conversation service checks it again on the way. Another user's id answers as one that does not
exist (``GONE``). One session is held by one conversation at a time: taking it into a tab lets go
of it in the user's other tab (told so on its next question), never while it answers there, and
never from another front end (the JSON API, ``/v1``...), which keeps its own.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass

from interpreter import Chat, ConversationService, TurnBusy
from sandbox import Caller, JupyboxError, SessionClosed
from store import SessionRecord

from .ownership import owned_key

log = logging.getLogger(__name__)

SESSION_ID = re.compile(r"[0-9a-f]{12}")  # how the sandbox names sessions: anything else names none
SHOWN = 50  # earlier conversations listed, newest use first
RELEASE_GRACE_S = 2.0  # how long a loading page waits for a reloaded tab to let go of its conversation
ENDED = ("The session of this conversation is gone (deleted, or kept unused past its retention): this question "
         "starts a fresh one, without its files and variables.")
GONE = "That conversation is gone (deleted, or kept unused past its retention): pick another from History · 历史."
TAKEN = ("This conversation is now open in another tab: pick it from History · 历史 to continue it here, "
         "or press New session.")
BUSY_HERE = "Still working on the previous question: wait, or press Stop."


class ConversationElsewhere(JupyboxError):
    """The conversation a page asked for is in use elsewhere: answering in another tab, or open
    through another front end."""


def session_id_of(choice: object) -> str | None:
    """The session id a page sent (the history's choice), or None when it cannot be one."""
    return choice if isinstance(choice, str) and SESSION_ID.fullmatch(choice) else None


def page_key(caller: Caller, tab: str) -> str:
    """The conversation key of a user's page (``tab`` is its Gradio session id)."""
    return f"web:{owned_key(caller, tab)}"


@dataclass
class EarlierConversations:
    """The conversation service's sessions and conversations as one user's pages see them."""

    service: ConversationService

    async def of(self, caller: Caller) -> list[SessionRecord]:
        """The user's own sessions, newest use first, at most ``SHOWN`` (none where sessions end
        with their tabs)."""
        records = await asyncio.to_thread(self.service.history, caller)
        return [r for r in records if r.owner == caller.name][:SHOWN]

    def holders(self, key: str, session_id: str) -> list[Chat]:
        """The conversations other than ``key`` that hold the session."""
        return [c for c in self.service.chats() if c.conversation.session_id == session_id and c.key != key]

    def _check_free(self, key: str, caller: Caller, session_id: str) -> list[Chat]:
        """The user's other tabs that hold the session, to let go of it; ``ConversationElsewhere``
        while one of them answers, or another front end holds it."""
        others = self.holders(key, session_id)
        for other in others:
            if not other.key.startswith(page_key(caller, "")):
                raise ConversationElsewhere(f"That conversation is open through another front end ({other.source}): "
                                            "continue it there, or pick another.")
            if other.busy:
                raise ConversationElsewhere("That conversation is answering a question in another tab: wait for it, "
                                            "or stop it there.")
        return others

    async def take(self, key: str, caller: Caller, session_id: str, records: list[SessionRecord]) -> Chat | None:
        """Bind the conversation ``key`` to an earlier session of the user's (one of ``records``)
        with the conversation its record keeps, and count that as its latest use (the page that
        loads next shows it); None when ``key`` holds that session already. ``SessionClosed``
        (``GONE``) for any other id; ``ConversationElsewhere``; ``TurnBusy`` while ``key``'s own
        turn runs."""
        if session_id not in {r.id for r in records}:
            raise SessionClosed(GONE)
        mine = self.service.get(key)
        if mine is not None and mine.conversation.session_id == session_id:
            return None
        if mine is not None and mine.busy:
            raise TurnBusy(BUSY_HERE)
        for other in self._check_free(key, caller, session_id):
            self.service.forget(other.key)
        try:
            chat = self.service.reopen(key, "web", session_id, caller=caller)
        except SessionClosed:  # closed since it was listed: the same words as for any other id
            raise SessionClosed(GONE) from None
        await self.service.remember(chat)
        return chat

    async def newest_free(self, key: str, caller: Caller, records: list[SessionRecord]) -> str | None:
        """The newest of ``records`` that no other conversation holds. A reloaded tab lets go of
        its conversation when the server hears that it went away, which can be just after the
        new page loads: while one newer than the first free one is held by another of the user's
        pages, this waits up to ``RELEASE_GRACE_S`` for it to be let go."""
        prefix = page_key(caller, "")
        deadline = time.monotonic() + RELEASE_GRACE_S
        while True:
            held = {c.conversation.session_id: c.key for c in self.service.chats() if c.key != key}
            free = next((r.id for r in records if r.id not in held), None)
            newer = records[:[r.id for r in records].index(free)] if free is not None else records
            if not any(held[r.id].startswith(prefix) for r in newer) or time.monotonic() >= deadline:
                return free
            await asyncio.sleep(0.05)

    async def delete(self, key: str, caller: Caller, session_id: str, records: list[SessionRecord]) -> None:
        """Close one of the user's sessions for good (record, files, variables), letting go of it
        in every conversation that holds it; not while one of them answers."""
        if session_id not in {r.id for r in records}:
            raise SessionClosed(GONE)
        mine = self.service.get(key)
        if mine is not None and mine.conversation.session_id == session_id and mine.busy:
            raise TurnBusy(BUSY_HERE)
        if any(c.busy for c in self.holders(key, session_id)):
            raise ConversationElsewhere("That conversation is answering a question elsewhere: wait for it, or stop it "
                                        "there.")
        try:
            await self.service.delete(session_id, caller)
        except SessionClosed:
            raise SessionClosed(GONE) from None
        log.info("session %s deleted from %s's page", session_id, caller.name)
