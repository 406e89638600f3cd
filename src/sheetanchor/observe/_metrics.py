"""The one Prometheus registry every sheetanchor metric is registered on.

Names follow ``sheetanchor_<part>_<what>_<unit>``; labels are low-cardinality only
(a stream or pool name, never a key or a user id). Expose it with
``prometheus_client.generate_latest(REGISTRY)`` or ``start_http_server(port, registry=REGISTRY)``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

__all__ = ["REGISTRY", "metric_name"]

REGISTRY = CollectorRegistry(auto_describe=True)


def metric_name(part: str, what: str, unit: str = "") -> str:
    """Build ``sheetanchor_<part>_<what>[_<unit>]``."""
    name = f"sheetanchor_{part}_{what}"
    return f"{name}_{unit}" if unit else name
