"""Prometheus metrics, in a registry of the app's own (no global state, so several apps can share a process).

Under `relaybot serve --workers N` a scrape reaches whichever worker the kernel gives the connection, so the
supervisor gives its workers a shared directory (`PROMETHEUS_MULTIPROC_DIR`, prometheus_client's multi-process
mode, which the library reads when it is imported): every worker writes its values there, and the worker that
answers a scrape adds up all of them, those of workers that have died included, so counters never go back.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

CONTENT_TYPE = CONTENT_TYPE_LATEST
SHARED_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    def __init__(self) -> None:
        # The `--workers` supervisor sets it for its workers; prometheus_client decides by it how values are kept.
        self.shared_dir = os.environ.get(SHARED_DIR_VARIABLE) or None
        self.registry = CollectorRegistry(auto_describe=True)
        self.events_received = Counter("relaybot_events_received", "Events accepted and stored",
                                       ["source"], registry=self.registry)
        self.events_rejected = Counter("relaybot_events_rejected", "Inbound webhooks refused",
                                       ["source", "reason"], registry=self.registry)
        self.events_duplicate = Counter("relaybot_events_duplicate", "Deliveries seen before, started nothing",
                                        ["source"], registry=self.registry)
        self.events_set_aside = Counter("relaybot_events_set_aside", "Stored events the intake failed on and set "
                                        "aside (relaybot events list)", ["source"], registry=self.registry)
        self.runs_finished = Counter("relaybot_runs_finished", "Runs that ended, by outcome", ["outcome"],
                                     registry=self.registry)
        self.step_seconds = Histogram("relaybot_step_duration_seconds", "Time an action took, per attempt",
                                      ["action"], registry=self.registry,
                                      buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
        self.slack_calls = Counter("relaybot_slack_api_calls", "Slack Web API calls", ["method", "result"],
                                   registry=self.registry)
        self.slack_retries = Counter("relaybot_slack_api_retries", "Slack calls retried (429, 5xx, timeouts)",
                                     ["method", "reason"], registry=self.registry)
        # Read from the database before each scrape: with several workers, the answering worker's value is the
        # most recent one, and the one to show.
        self.outbox_depth = Gauge("relaybot_outbox_depth", "Slack messages waiting in the outbox",
                                  registry=self.registry, multiprocess_mode="mostrecent")
        self.inbox_depth = Gauge("relaybot_inbox_depth", "Stored events not yet turned into runs",
                                 registry=self.registry, multiprocess_mode="mostrecent")
        self.runs_active = Gauge("relaybot_runs_active", "Runs not yet finished, by state", ["state"],
                                 registry=self.registry, multiprocess_mode="mostrecent")
        self._refreshers: list[Callable[[], Awaitable[None]]] = []

    def on_scrape(self, refresher: Callable[[], Awaitable[None]]) -> None:
        """Register a coroutine that updates gauges from the database before each scrape."""
        self._refreshers.append(refresher)

    async def render(self) -> bytes:
        for refresher in self._refreshers:
            await refresher()
        if self.shared_dir is None:
            return generate_latest(self.registry)
        every_worker = CollectorRegistry()
        MultiProcessCollector(every_worker, path=self.shared_dir)
        return generate_latest(every_worker)
