"""One log line and the metrics per finished request, for every front end (API and chat page)."""

from __future__ import annotations

import logging

from deployments.frontend.service import Finished
from deployments.telemetry.adapter_metrics import AdapterLabels
from deployments.telemetry.metrics import RequestMetrics


class RequestRecorder:
    """`record(finished)`: the request log line (like the seed chatbot's app.log) and metrics
    (model names as `labels` tags them). The request id in the line is the response's `id`."""

    def __init__(self, path: str | None, labels: AdapterLabels):
        self.metrics = RequestMetrics(labels)
        self.log = request_logger(path)

    def record(self, finished: Finished) -> None:
        model, endpoint, status, stats = finished.model, finished.endpoint, finished.status, finished.stats
        self.metrics.record(model, endpoint, status, stats)
        if stats is None:
            self.log.info("id=%s model=%s endpoint=%s status=%d", finished.request_id, model, endpoint, status)
            return
        self.log.info(
            "id=%s model=%s endpoint=%s status=%d prompt_tokens=%d cached_tokens=%d completion_tokens=%d "
            "latency=%.3fs queue=%s ttft=%s tokens_per_s=%s dropped_messages=%d replica=%s stop_reason=%s",
            finished.request_id, model, endpoint, status, stats.prompt_tokens, stats.cached_prompt_tokens,
            stats.completion_tokens, stats.latency, _fmt(stats.queue_s, "{:.3f}s"),
            _fmt(stats.time_to_first_token, "{:.3f}s"), _fmt(stats.tokens_per_second, "{:.1f}"),
            stats.dropped_messages, finished.replica or "-", stats.stop_reason or "-",
        )


def request_logger(path: str | None) -> logging.Logger:
    """The per-request logger: Serve's replica log, and `path` too when given."""
    logger = logging.getLogger("ray.serve.requests")
    if path and not any(isinstance(h, logging.FileHandler) for h in logger.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)
