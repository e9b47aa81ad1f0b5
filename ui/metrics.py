"""Prometheus metrics of one server, in a registry of its own (so several apps can live in one
process, as in the tests). Served as text at ``/metrics``; every name starts with ``jupybox_``."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from interpreter import Event
from sandbox import Execution, SessionManager

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """What the server counts. ``observe_execution`` for every finished execution (API or chat);
    as an observer of the conversation service, ``observe_event`` and ``observe_turn`` for every
    event and turn of every front end (labelled by its source: web, api, openai, mcp...)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, manager: SessionManager) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions_open = Gauge("jupybox_sessions_open", "Sandbox sessions open now", registry=r)
        self.sessions_open.set_function(lambda: len(manager.list()))
        self.sessions_created = Counter("jupybox_sessions_created", "Sandbox sessions created", registry=r)
        self.executions = Counter("jupybox_executions", "Code executions, by status (ok, error, timeout, crashed)",
                                  ["status", "source"], registry=r)
        self.execution_seconds = Histogram("jupybox_execution_duration_seconds", "Time one execution took",
                                           ["source"], buckets=DURATION_BUCKETS, registry=r)
        self.turns = Counter("jupybox_chat_turns", "Interpreter turns, by outcome (answer, error)",
                             ["outcome", "source"], registry=r)
        self.turn_seconds = Histogram("jupybox_chat_turn_duration_seconds", "Time one interpreter turn took",
                                      ["source"], buckets=DURATION_BUCKETS, registry=r)
        self.tokens = Counter("jupybox_model_tokens", "Model tokens, by kind (prompt, completion)",
                              ["kind"], registry=r)
        for kind in ("prompt", "completion"):  # the series exist from the start, at 0
            self.tokens.labels(kind)
        self.kernel_messages = Counter("jupybox_kernel_messages", "Jupyter messages relayed between notebook "
                                       "clients and kernels, by direction (to_kernel, to_client)",
                                       ["direction"], registry=r)
        self.kernel_messages_refused = Counter("jupybox_kernel_messages_refused", "Notebook clients' messages "
                                               "refused (malformed, oversized, not allowed)", registry=r)
        self.failures = Counter("jupybox_request_failures", "API requests answered with an error, by HTTP status",
                                ["status"], registry=r)

    def observe_execution(self, execution: Execution, source: str) -> None:
        self.executions.labels(execution.status.value, source).inc()
        self.execution_seconds.labels(source).observe(execution.duration_s)

    def observe_event(self, event: Event, source: str) -> None:
        if event.type == "execution" and event.execution is not None:
            self.observe_execution(event.execution, source)
        elif event.usage is not None:
            self.tokens.labels("prompt").inc(event.usage.prompt_tokens)
            self.tokens.labels("completion").inc(event.usage.completion_tokens)

    def observe_turn(self, outcome: str, seconds: float, source: str) -> None:
        self.turns.labels(outcome, source).inc()
        self.turn_seconds.labels(source).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
