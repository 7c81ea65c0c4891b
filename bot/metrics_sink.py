"""What the core reports to metrics, as an interface: the Prometheus registry lives in the
operations adapter (:mod:`bot.ops.metrics`), which the core must not import. The bot passes
that registry in; the console and tests run with :data:`NO_METRICS`."""

from __future__ import annotations

from typing import Protocol


class MetricsSink(Protocol):
    def observe_verdict(self, latency_s: float) -> None: ...

    def observe_reply(self, latency_s: float) -> None: ...

    def count_message(self) -> None: ...

    def count_vote(self, version: str, correct: bool) -> None: ...

    def count_decision(self, action: str) -> None: ...


class NullMetrics:
    """Counts nothing: for the console, the command lines and tests."""

    def observe_verdict(self, latency_s: float) -> None:
        pass

    def observe_reply(self, latency_s: float) -> None:
        pass

    def count_message(self) -> None:
        pass

    def count_vote(self, version: str, correct: bool) -> None:
        pass

    def count_decision(self, action: str) -> None:
        pass


NO_METRICS: MetricsSink = NullMetrics()
