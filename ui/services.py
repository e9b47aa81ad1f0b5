"""What ``jupybox serve`` runs on: its settings and the conversation service (which holds the
sandbox manager and the model). The HTTP API, the browser UI and the OpenAI endpoint all take a
``Services`` and run every turn through ``services.service``; none of them keeps conversations.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from interpreter import ConversationService, InterpreterSettings, ModelSettings
from interpreter.llm import LLM
from sandbox import JupyboxError, SandboxSettings, SessionManager
from store import AuditLog, KeyIndex, UserStore, audit_path

from .auth import Auditor

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 7860
    api_token: str | None = None  # when set, the API and the UI require it (or a user's key); an admin key
    audit_log: str | None = None  # the audit log's file (default: JUPYBOX_AUDIT_LOG, else JUPYBOX_HOME/audit.jsonl)
    audit_code: bool = False  # the audit log keeps the code run, not only its hash and length
    cors_origins: list[str] = field(default_factory=list)  # other sites' pages allowed to call (none by default)
    trusted_proxies: list[str] = field(default_factory=list)  # addresses whose X-Forwarded-* headers are believed
    header_timeout_s: float = 10.0  # a connection's request head must arrive within this
    body_idle_s: float = 30.0  # a request body that sends nothing for this long is given up (408)
    max_connections: int = 512  # open client connections at most
    upload_limit_mb: int = 100  # one upload request body; the workspace quotas apply as well
    ui_cache_mb: int = 2048  # the browser UI's uploads and shown files, in all
    model: ModelSettings = field(default_factory=ModelSettings)
    sandbox: SandboxSettings = field(default_factory=SandboxSettings)
    interpreter: InterpreterSettings = field(default_factory=InterpreterSettings)

    @classmethod
    def from_env(cls, **overrides: object) -> ServeSettings:
        """The server's own ``JUPYBOX_*`` variables; flags (``overrides``) win. The model's and the
        sandbox's settings come read already (``ModelSettings.from_env``, ``SandboxSettings.from_env``)."""
        env = os.environ
        values: dict[str, object] = {
            "host": env.get("JUPYBOX_HOST") or None,
            "port": int(env["JUPYBOX_PORT"]) if env.get("JUPYBOX_PORT") else None,
            "upload_limit_mb": int(env["JUPYBOX_UPLOAD_LIMIT_MB"]) if env.get("JUPYBOX_UPLOAD_LIMIT_MB") else None,
            "ui_cache_mb": int(env["JUPYBOX_UI_CACHE_MB"]) if env.get("JUPYBOX_UI_CACHE_MB") else None,
            "api_token": env.get("JUPYBOX_API_TOKEN") or None,
            "max_connections": int(env["JUPYBOX_MAX_CONNECTIONS"]) if env.get("JUPYBOX_MAX_CONNECTIONS") else None,
        }
        if env.get("JUPYBOX_CORS_ORIGINS"):
            values["cors_origins"] = env["JUPYBOX_CORS_ORIGINS"].split(",")
        if env.get("JUPYBOX_TRUSTED_PROXIES"):
            values["trusted_proxies"] = env["JUPYBOX_TRUSTED_PROXIES"].split(",")
        token_file = overrides.pop("api_token_file", None) or env.get("JUPYBOX_API_TOKEN_FILE")
        if token_file:
            values["api_token"] = read_token_file(str(token_file))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**{k: v for k, v in values.items() if v is not None})  # type: ignore[arg-type]


def read_token_file(path: str) -> str:
    """The API token kept in a file (its first line), so that it is not visible in ``ps``."""
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.readline().strip()
    except OSError as exc:
        raise JupyboxError(f"cannot read the API token file {path}: {exc.strerror}") from None
    if not token:
        raise JupyboxError(f"the API token file {path} is empty: put the token on its first line")
    return token


class Services:
    """The long-lived parts of one server: built from its settings, started and stopped by the
    app's lifespan (every sandbox session is closed on the way out)."""

    def __init__(self, settings: ServeSettings, llm: LLM | None = None) -> None:
        """``llm``: a model made already (loaded or not) instead of the one ``settings.model`` names."""
        self.settings = settings
        self.manager = SessionManager(settings.sandbox)
        self.service = ConversationService(self.manager, llm or settings.model, settings.interpreter)
        # Users live beside the sessions, under JUPYBOX_HOME, where `jupybox users` writes them.
        self.users = KeyIndex(UserStore.at_home(settings.sandbox.home))
        self.audit = AuditLog(audit_path(settings.audit_log, settings.sandbox.home),
                              secrets=[settings.api_token] if settings.api_token else [])
        # session, execute, chat and file events go to the same log, each with its user
        self.auditor = Auditor(self.audit)
        self.service.audit = self.auditor
        self.service.audit_code = settings.audit_code
        self.manager.on_event = lambda action, sid, owner, detail: self.auditor(action, owner, sid, detail)

    async def start(self) -> None:
        await self.service.start()

    async def stop(self) -> None:
        await self.service.stop()
        self.users.close()
        self.auditor.close()
