"""A dependency-free line chart: series over time as inline SVG inside a small HTML page."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Band", "Panel", "Series", "write_html"]

_COLORS = ("#c0392b", "#2471a3", "#1e8449", "#7d3c98", "#b9770e")
_W, _H, _PAD_L, _PAD_R, _PAD_T, _PAD_B = 760, 240, 70, 20, 30, 35


@dataclass(frozen=True, slots=True)
class Series:
    """One line: ``points`` are ``(seconds, value)``."""

    label: str
    points: Sequence[tuple[float, float]]


@dataclass(frozen=True, slots=True)
class Band:
    """A shaded time range (e.g. the outage)."""

    label: str
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class Panel:
    """One chart: a title, a y-axis unit, its series and bands."""

    title: str
    unit: str
    series: Sequence[Series]
    bands: Sequence[Band] = ()


def _fmt(v: float) -> str:
    if abs(v) >= 1_000_000:
        return f"{v / 1_000_000:.1f}M"
    if abs(v) >= 1_000:
        return f"{v / 1_000:.0f}k"
    return f"{v:.0f}"


def _panel_svg(panel: Panel) -> str:
    xs = [x for s in panel.series for x, _ in s.points] + [b.end for b in panel.bands] or [1.0]
    ys = [y for s in panel.series for _, y in s.points] or [1.0]
    x_max = max(max(xs), 1e-9)
    y_max = max(max(ys), 1.0) * 1.08
    plot_w, plot_h = _W - _PAD_L - _PAD_R, _H - _PAD_T - _PAD_B

    def px(x: float) -> float:
        return _PAD_L + plot_w * x / x_max

    def py(y: float) -> float:
        return _PAD_T + plot_h * (1 - y / y_max)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
        f'font-family="sans-serif" font-size="11">',
        f'<text x="{_PAD_L}" y="18" font-size="13" font-weight="bold">'
        f"{html.escape(panel.title)}</text>",
    ]
    for band in panel.bands:
        out.append(
            f'<rect x="{px(band.start):.1f}" y="{_PAD_T}" '
            f'width="{max(px(band.end) - px(band.start), 1):.1f}" height="{plot_h}" '
            f'fill="#f5b7b1" opacity="0.45"/>'
            f'<text x="{px(band.start) + 3:.1f}" y="{_PAD_T + 12}" fill="#922b21">'
            f"{html.escape(band.label)}</text>"
        )
    for i in range(5):
        y = y_max * i / 4
        out.append(
            f'<line x1="{_PAD_L}" x2="{_W - _PAD_R}" y1="{py(y):.1f}" y2="{py(y):.1f}" '
            f'stroke="#ddd"/><text x="{_PAD_L - 6}" y="{py(y) + 4:.1f}" text-anchor="end">'
            f"{_fmt(y)}</text>"
        )
    for i in range(6):
        x = x_max * i / 5
        out.append(
            f'<text x="{px(x):.1f}" y="{_H - _PAD_B + 16}" text-anchor="middle">{x:.1f} s</text>'
        )
    out.append(
        f'<text x="14" y="{_PAD_T + plot_h / 2:.0f}" transform="rotate(-90 14 '
        f'{_PAD_T + plot_h / 2:.0f})" text-anchor="middle">{html.escape(panel.unit)}</text>'
    )
    for n, series in enumerate(panel.series):
        color = _COLORS[n % len(_COLORS)]
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in series.points)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>')
        out.append(
            f'<rect x="{_W - _PAD_R - 260}" y="{_PAD_T + 4 + 16 * n}" width="12" height="3" '
            f'fill="{color}"/><text x="{_W - _PAD_R - 242}" y="{_PAD_T + 9 + 16 * n}">'
            f"{html.escape(series.label)}</text>"
        )
    out.append("</svg>")
    return "\n".join(out)


def write_html(path: Path, title: str, panels: Sequence[Panel], notes: Sequence[str] = ()) -> Path:
    """Write a self-contained HTML page with one SVG chart per panel; return ``path``."""
    body = "\n".join(f"<div>{_panel_svg(p)}</div>" for p in panels)
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"</head><body style='font-family:sans-serif'><h2>{html.escape(title)}</h2>"
        f"<ul>{items}</ul>{body}</body></html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path
