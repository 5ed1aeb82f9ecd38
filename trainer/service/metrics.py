"""Prometheus metrics of the trainer service, on a registry of its own.

The service serves them itself (``/metrics`` on ``metrics_port``, a ``prometheus_client`` HTTP server in
a thread): the trainer is its own process in the distributed setup, so Prometheus scrapes it like the
gateway, and nothing has to push. Names start with ``asyncthink_trainer_``.
"""

from __future__ import annotations

from typing import Any


class TrainerMetrics:
    """Counters, gauges and histograms of cycles, data, the gate and swaps."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.cycles = Counter(
            "asyncthink_trainer_cycles", "Trainer cycles by outcome (published, rejected, no_signal, "
            "swap_failed, rolled_back, superseded).", ["outcome"], registry=r,
        )  # fmt: skip
        self.episodes_consumed = Counter(
            "asyncthink_trainer_episodes_consumed", "Stored episodes a cycle trained on.", registry=r
        )
        self.episodes_skipped = Counter(
            "asyncthink_trainer_episodes_skipped", "Stored episodes the filters dropped, by reason.", ["reason"],
            registry=r,
        )  # fmt: skip
        self.episodes_submitted = Counter(
            "asyncthink_trainer_episodes_submitted", "Episodes the trainer submitted (GRPO groups, post-swap "
            "checks).", ["purpose"], registry=r,
        )  # fmt: skip
        self.phase_seconds = Histogram(
            "asyncthink_trainer_phase_seconds", "Seconds per cycle phase (data, train, gate, publish, check).",
            ["phase"], registry=r, buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
        )  # fmt: skip
        self.cycle_seconds = Histogram(
            "asyncthink_trainer_cycle_seconds", "Seconds per trainer cycle that trained a candidate.", registry=r,
            buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200),
        )  # fmt: skip
        self.gate_score = Gauge(
            "asyncthink_trainer_gate_score", "Last gate's held-out score, by side (candidate, serving) and metric.",
            ["side", "metric"], registry=r,
        )  # fmt: skip
        self.swaps = Counter(
            "asyncthink_trainer_swaps", "Publications to the fleet by reason and outcome.", ["reason", "outcome"],
            registry=r,
        )  # fmt: skip
        self.swap_pause = Histogram(
            "asyncthink_trainer_swap_pause_seconds", "Seconds a serving process held generation to take new "
            "weights, by process kind.", ["kind"], registry=r,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
        )  # fmt: skip
        self.cycle = Gauge("asyncthink_trainer_cycle", "The last cycle number started.", registry=r)
        self.paused = Gauge("asyncthink_trainer_paused", "1 while training is paused.", registry=r)
        self.serving = Gauge(
            "asyncthink_trainer_serving", "1 for the version that serves now.", ["version"], registry=r
        )
        self._serving: str | None = None

    def set_serving(self, version: str) -> None:
        if self._serving is not None:
            self.serving.remove(self._serving)
        self.serving.labels(version).set(1)
        self._serving = version

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))

    def serve(self, port: int, host: str = "0.0.0.0") -> Any:
        """Serve ``/metrics`` on ``port`` in a background thread; returns the server (``shutdown()``)."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
