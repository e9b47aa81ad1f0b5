"""Prometheus metrics of one server, in a registry of its own (so several apps can live in one
process, as in the tests). Served as text at ``/metrics``; every name starts with ``jupybox_``."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from interpreter import Event
from interpreter.llm import LLM
from sandbox import Execution, SessionManager

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """What the server counts. ``observe_execution`` for every finished execution (API or chat);
    as an observer of the conversation service, ``observe_event`` and ``observe_turn`` for every
    event and turn of every front end (labelled by its source: web, api, openai, mcp...)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, manager: SessionManager, model: Callable[[], LLM | None] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        if model is not None:
            r.register(ModelStreams(model))
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


class ModelStreams(Collector):
    """The local model's generations (``LLM.streams()``), read when scraped: nothing while no model
    that schedules its own is loaded."""

    def __init__(self, model: Callable[[], LLM | None]) -> None:
        self.model = model

    def describe(self) -> list[Metric]:
        return []  # names known only once a model is loaded: no check for clashes at registration

    def collect(self) -> Iterator[Metric]:
        llm = self.model()
        stats = llm.streams() if llm is not None else None
        if stats is None:
            return
        yield GaugeMetricFamily("jupybox_model_streams_active", "Generations of the local model decoding now "
                                "(or having their prompt read)", value=stats.active)
        yield GaugeMetricFamily("jupybox_model_streams_queued", "Generations of the local model waiting for a "
                                "stream", value=stats.queued)
        yield GaugeMetricFamily("jupybox_model_streams_max", "Generations the local model decodes together",
                                value=stats.slots)
        yield GaugeMetricFamily("jupybox_model_tokens_per_second", "Tokens the local model generated per second, "
                                "over the last 10 s", value=stats.tokens_per_s)
        yield CounterMetricFamily("jupybox_model_generated_tokens", "Tokens the local model generated since it "
                                  "loaded", value=stats.tokens)
