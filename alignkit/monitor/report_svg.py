"""Line charts as inline SVG for the run report: no charting library, no script, no network.

A chart is a few axes, ticks and one `<path>` per series, each path tagged with the metric it
draws (`data-metric`), so the page can be checked by reading its DOM as well as by looking at it.
`metric_charts` turns metrics.jsonl rows into charts: related metrics share axes, and each eval
metric (`eval/<name>`) is drawn dashed on the same axes as its train counterpart.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any, NamedTuple

# Colour-blind-safe palette (Okabe-Ito); series of one chart take colours in order.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#d55e00", "#56b4e9", "#000000")
WIDTH, HEIGHT = 600, 300
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_BOTTOM = 64, 16, 40
LEGEND_TOP, LEGEND_ROW = 34, 16  # the plot starts below the title and the legend's rows
# Sparse series (eval rows, short runs) also get a dot per point: one point alone draws no line.
MARKER_MAX_POINTS = 40

# Charts drawn first and in this order when the run has them; metrics of one group share axes.
# Any other logged metric gets a chart of its own after these. eval/<name> joins <name>'s chart.
CHART_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss",)),
    ("rewards/margins", ("rewards/margins",)),
    ("rewards/accuracies", ("rewards/accuracies",)),
    ("rewards/chosen vs rejected", ("rewards/chosen", "rewards/rejected")),
    ("logps/chosen vs rejected", ("logps/chosen", "logps/rejected")),
    ("objective/kl", ("objective/kl",)),
    ("objective/scores", ("objective/scores",)),
    ("objective/rlhf_reward", ("objective/rlhf_reward",)),
    ("response/length", ("response/length",)),
    ("learning_rate", ("learning_rate",)),
    ("grad_norm", ("grad_norm",)),
)
NOT_CHARTED = {"step", "epoch"}


class Band(NamedTuple):
    """A healthy range drawn behind a chart's curves: shaded for train, dashed lines for eval
    (as the eval curves themselves are dashed)."""

    label: str
    lo: float
    hi: float
    colour: str
    kind: str  # "train" | "eval"


# Preference accuracy on real preference data (HH-RLHF, UltraFeedback): train accuracy well
# below 1.0, since real labels are noisy, and held-out a little lower; above these is usually
# memorised or trivially easy pairs, below is little learned.
BANDS: tuple[Band, ...] = (
    Band("healthy train 0.75–0.92", 0.75, 0.92, "#009e73", "train"),
    Band("healthy held-out 0.70–0.90", 0.70, 0.90, "#d55e00", "eval"),
)
CHART_BANDS: dict[str, tuple[Band, ...]] = {"rewards/accuracies": BANDS}
NON_FINITE_TEXT = {"nan", "inf", "-inf", "infinity", "-infinity"}


class Series(NamedTuple):
    """One metric over steps; `points` may hold NaN/inf, which are not drawn."""

    metric: str
    points: list[tuple[float, float]]
    colour: str
    dashed: bool = False


class Frame(NamedTuple):
    """Data ranges mapped onto a plot area in pixels (SVG y grows downwards)."""

    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float
    left: float
    top: float
    width: float
    height: float
    x_ticks: tuple[float, ...] = ()
    y_ticks: tuple[float, ...] = ()

    def x(self, value: float) -> float:
        return self.left + (value - self.x_lo) / (self.x_hi - self.x_lo) * self.width

    def y(self, value: float) -> float:
        return self.top + self.height - (value - self.y_lo) / (self.y_hi - self.y_lo) * self.height


def finite(value: object) -> bool:
    """A number we can draw; not a bool, None, or the "nan"/"inf" strings the logger writes."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k apart) whose first and last enclose [lo, hi]."""
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        # A flat series still needs a range to be drawn in the middle of
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / target
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    # The small slack keeps 0.3/0.1 = 2.9999999999999996 from adding a spurious tick
    first = math.floor(lo / step + 1e-9)
    last = math.ceil(hi / step - 1e-9)
    # Rounding to the step's precision turns 0.30000000000000004 into 0.3
    digits = max(0, -math.floor(math.log10(step)) + 2)
    return [round(i * step, digits) for i in range(first, last + 1)]


def tick_label(value: float) -> str:
    if value == int(value) and abs(value) < 1e7:
        return str(int(value))
    return format(value, ".4g")


def frame_for(
    series: list[Series], top: float = LEGEND_TOP + 14, bands: tuple[Band, ...] = ()
) -> Frame | None:
    """The frame holding every finite point of every series, and the bands, so a healthy range
    stays in view however far the curves are from it; None when no series has a point."""
    xs = [x for s in series for x, y in s.points if finite(x) and finite(y)]
    ys = [y for s in series for x, y in s.points if finite(x) and finite(y)]
    if not xs:
        return None
    ys += [v for b in bands for v in (b.lo, b.hi)]
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    return Frame(
        xt[0],
        xt[-1],
        yt[0],
        yt[-1],
        MARGIN_LEFT,
        top,
        WIDTH - MARGIN_LEFT - MARGIN_RIGHT,
        HEIGHT - top - MARGIN_BOTTOM,
        tuple(xt),
        tuple(yt),
    )


def path_data(points: list[tuple[float, float]], frame: Frame) -> str:
    """SVG path commands; a NaN/inf value breaks the line instead of being joined across."""
    parts: list[str] = []
    pen_down = False
    for x, y in points:
        if not (finite(x) and finite(y)):
            pen_down = False
            continue
        parts.append(f"{'L' if pen_down else 'M'}{frame.x(x):.2f},{frame.y(y):.2f}")
        pen_down = True
    return " ".join(parts)


def _dom_id(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text)


def _axes(frame: Frame) -> list[str]:
    """Plot box, grid lines and labelled ticks on both axes."""
    bottom, right = frame.top + frame.height, frame.left + frame.width
    out = [
        f'<rect x="{frame.left}" y="{frame.top}" width="{frame.width}" height="{frame.height}" '
        'fill="none" stroke="#888"/>'
    ]
    for v in frame.y_ticks:
        y = frame.y(v)
        out.append(
            f'<line class="grid" x1="{frame.left}" y1="{y:.2f}" x2="{right}" y2="{y:.2f}" '
            'stroke="#e4e4e4"/>'
            f'<text class="tick y" x="{frame.left - 6}" y="{y + 4:.2f}" text-anchor="end">'
            f"{tick_label(v)}</text>"
        )
    for v in frame.x_ticks:
        x = frame.x(v)
        out.append(
            f'<line x1="{x:.2f}" y1="{bottom}" x2="{x:.2f}" y2="{bottom + 5}" stroke="#888"/>'
            f'<text class="tick x" x="{x:.2f}" y="{bottom + 18}" text-anchor="middle">'
            f"{tick_label(v)}</text>"
        )
    out.append(
        f'<text class="axis-label" x="{frame.left + frame.width / 2}" y="{HEIGHT - 4}" '
        'text-anchor="middle">step</text>'
    )
    return out


def _series(s: Series, frame: Frame) -> list[str]:
    kind = "eval" if s.dashed else "train"
    dash = ' stroke-dasharray="6 4"' if s.dashed else ""
    out = [
        f'<path class="series {kind}" id="series-{_dom_id(s.metric)}" '
        f'data-metric="{escape(s.metric)}" d="{path_data(s.points, frame)}" fill="none" '
        f'stroke="{s.colour}" stroke-width="2"{dash}/>'
    ]
    drawn = [(x, y) for x, y in s.points if finite(x) and finite(y)]
    if len(drawn) <= MARKER_MAX_POINTS:
        out += [
            f'<circle class="marker" cx="{frame.x(x):.2f}" cy="{frame.y(y):.2f}" r="3" '
            f'fill="{s.colour}"/>'
            for x, y in drawn
        ]
    return out


def _band(b: Band, frame: Frame) -> str:
    """A train band as a shaded strip; an eval band as two dashed lines at its edges."""
    left, width = frame.left, frame.width
    top, bottom = frame.y(b.hi), frame.y(b.lo)
    if b.kind == "train":
        return (
            f'<rect class="band train" x="{left}" y="{top:.2f}" width="{width}" '
            f'height="{bottom - top:.2f}" fill="{b.colour}" fill-opacity="0.14"/>'
        )
    return "".join(
        f'<line class="band eval" x1="{left}" y1="{y:.2f}" x2="{left + width}" y2="{y:.2f}" '
        f'stroke="{b.colour}" stroke-width="1.5" stroke-dasharray="2 3"/>'
        for y in (top, bottom)
    )


def _swatch(x: float, y: float, item: Series | Band) -> str:
    if isinstance(item, Band):
        if item.kind == "train":
            return (
                f'<rect x="{x}" y="{y - 9}" width="22" height="10" fill="{item.colour}" '
                'fill-opacity="0.14" stroke="none"/>'
            )
        return (
            f'<line x1="{x}" y1="{y - 4}" x2="{x + 22}" y2="{y - 4}" stroke="{item.colour}" '
            'stroke-width="1.5" stroke-dasharray="2 3"/>'
        )
    dash = ' stroke-dasharray="6 4"' if item.dashed else ""
    return (
        f'<line x1="{x}" y1="{y - 4}" x2="{x + 22}" y2="{y - 4}" stroke="{item.colour}" '
        f'stroke-width="2"{dash}/>'
    )


def _legend(items: list[Series | Band]) -> tuple[list[str], float]:
    """Swatch and name per series and band, wrapped onto rows; also where the plot can start."""
    out, x, y = [], MARGIN_LEFT, LEGEND_TOP
    for item in items:
        label = item.label if isinstance(item, Band) else item.metric
        width = 34 + 6.5 * len(label)  # about 6.5 px per character at the legend's size
        if x > MARGIN_LEFT and x + width > WIDTH - MARGIN_RIGHT:
            x, y = MARGIN_LEFT, y + LEGEND_ROW
        text = f'<text class="legend" x="{x + 27}" y="{y}">{escape(label)}</text>'
        out.append(_swatch(x, y, item) + text)
        x += width
    return out, y + 14


def line_chart(title: str, series: list[Series], bands: tuple[Band, ...] = ()) -> str:
    """One chart, with healthy bands behind its curves; an empty string when no series has a
    finite point."""
    legend, top = _legend([*series, *bands])
    frame = frame_for(series, top, bands)
    if frame is None:
        return ""
    body = [
        f'<text class="title" x="{MARGIN_LEFT}" y="18">{escape(title)}</text>',
        *legend,
        *_axes(frame),
        *(_band(b, frame) for b in bands),  # before the curves, so they are drawn on top
    ]
    for s in series:
        body += _series(s, frame)
    return (
        f'<svg class="chart" id="chart-{_dom_id(title)}" '
        f'role="img" aria-label="{escape(title)}" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}">' + "".join(body) + "</svg>"
    )


# --------------------------------------------------------------------------- metrics to charts


def non_finite(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in NON_FINITE_TEXT
    return isinstance(value, float) and not math.isfinite(value)


def chart_groups(names: list[str]) -> list[tuple[str, list[str]]]:
    """(title, bases) per chart: the known groups first, then each other metric alone."""
    bases = list(dict.fromkeys(n.removeprefix("eval/") for n in names))
    present = set(names)
    groups = [
        (title, [b for b in members if b in present or f"eval/{b}" in present])
        for title, members in CHART_GROUPS
    ]
    groups = [(t, m) for t, m in groups if m]
    grouped = {b for _, m in groups for b in m}
    return groups + [(b, [b]) for b in bases if b not in grouped and b not in NOT_CHARTED]


def _group_series(rows: list[dict], bases: list[str], names: set[str]) -> list[Series]:
    series = []
    for i, base in enumerate(bases):
        colour = PALETTE[i % len(PALETTE)]
        for metric, dashed in ((base, False), (f"eval/{base}", True)):
            if metric in names:
                pts = [(r["step"], r[metric]) for r in rows if metric in r]
                series.append(Series(metric, pts, colour, dashed))
    return series


def bands_for(title: str, series: list[Series]) -> tuple[Band, ...]:
    """The chart's healthy bands for the kinds of curve it has: the held-out band only beside
    an eval curve."""
    kinds = {"eval" if s.dashed else "train" for s in series}
    return tuple(b for b in CHART_BANDS.get(title, ()) if b.kind in kinds)


class Charts(NamedTuple):
    svgs: list[str]
    notes: list[str]  # what could not be drawn, and why


def metric_charts(rows: list[dict[str, Any]]) -> Charts:
    """One chart per metric group in metrics.jsonl rows, and notes on values not drawn."""
    names = [
        k
        for k in dict.fromkeys(k for r in rows for k in r)
        if any(finite(r.get(k)) or non_finite(r.get(k)) for r in rows)
    ]
    svgs, notes = [], []
    for title, bases in chart_groups(names):
        series = _group_series(rows, bases, set(names))
        svg = line_chart(title, series, bands_for(title, series))
        svgs.append(svg)
        if not svg:
            notes.append(f"{title}: no finite values to draw")
    for name in names:
        bad = [r["step"] for r in rows if non_finite(r.get(name))]
        if bad:
            notes.append(f"{name}: {len(bad)} NaN/inf value(s), first at step {bad[0]}; not drawn")
    return Charts(svgs, notes)
