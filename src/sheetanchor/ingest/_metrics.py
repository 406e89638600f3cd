"""Prometheus metrics of ingest, on the one registry; the only label is the stream name."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from sheetanchor.observe import REGISTRY, metric_name

__all__ = [
    "BUFFERED_BYTES",
    "BUFFERED_ROWS",
    "FILL",
    "FLUSH_SECONDS",
    "ROWS",
    "UNSAVED_ROWS",
]


def _counter(what: str, doc: str) -> Counter:
    return Counter(metric_name("ingest", what, "total"), doc, ["stream"], registry=REGISTRY)


ROWS: dict[str, Counter] = {
    "in": _counter("rows_in", "Records accepted by put, per stream."),
    "written": _counter("rows_written", "Rows committed to PostgreSQL, per stream."),
    "duplicate": _counter("rows_duplicate", "Rows skipped because they already existed."),
    "failed": _counter("rows_failed", "Rows dead-lettered after the retry budget was spent."),
    "quarantined": _counter("rows_quarantined", "Poison rows quarantined, per stream."),
    "spilled": _counter("rows_spilled", "Best-effort rows spilled to dead letters."),
    "rejected": _counter("rows_rejected", "Records refused by validation at put."),
    "replayed": _counter("rows_replayed", "Dead-lettered rows replayed into PostgreSQL."),
}
FILL = Gauge(
    metric_name("ingest", "fill", "ratio"),
    "Fill of a stream (rows or bytes held / limit, the larger), 0..1.",
    ["stream"],
    registry=REGISTRY,
)
BUFFERED_ROWS = Gauge(
    metric_name("ingest", "held", "rows"),
    "Rows held in memory (buffered + being written), per stream.",
    ["stream"],
    registry=REGISTRY,
)
BUFFERED_BYTES = Gauge(
    metric_name("ingest", "held", "bytes"),
    "Estimated bytes held in memory (buffered + being written), per stream.",
    ["stream"],
    registry=REGISTRY,
)
UNSAVED_ROWS = Gauge(
    metric_name("ingest", "unsaved", "rows"),
    "Rows neither in PostgreSQL nor in the dead-letter store (the store is full or the disk "
    "refuses); kept in memory, counted as held, retried; per stream.",
    ["stream"],
    registry=REGISTRY,
)
FLUSH_SECONDS = Histogram(
    metric_name("ingest", "flush", "seconds"),
    "Time to write one batch to PostgreSQL (including retries), per stream.",
    ["stream"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
