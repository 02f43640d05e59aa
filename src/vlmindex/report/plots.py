"""Small inline-SVG plots for the HTML report: heatmap, scatter, bars with error whiskers.

No plotting dependency and nothing fetched at view time: each function returns one ``<svg>``
string that is pasted into the page. Every string that reaches the markup goes through
:func:`esc`, because model, class and condition names come from user data. Each plot carries
``class="plot"`` and ``data-kind`` so a test (or a script) can find it in the rendered page.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

# Okabe–Ito (colour-blind safe) first, then Tableau-10 hues; past 16 classes colours repeat and
# the legend says so.
PALETTE = (
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
    "#4E79A7", "#F28E2B", "#59A14F", "#E15759", "#B07AA1", "#9C755F", "#76B7B2", "#BAB0AC",
)
MARKERS = ("circle", "triangle", "square", "diamond", "cross", "star", "triangle-down", "plus")

# Viridis anchors: perceptually uniform, readable in greyscale print.
_VIRIDIS = ((0.0, (68, 1, 84)), (0.25, (59, 82, 139)), (0.5, (33, 145, 140)), (0.75, (94, 201, 98)),
            (1.0, (253, 231, 37)))

FONT = "font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif"


def esc(value: object) -> str:
    """HTML/SVG-escape any value (quotes included, so it is safe inside attributes too)."""
    return html.escape(str(value), quote=True)


def _f(x: float) -> str:
    """Coordinates with two decimals: enough on screen, and keeps the file small."""
    return f"{x:.2f}".rstrip("0").rstrip(".")


def viridis(t: float) -> tuple[int, int, int]:
    """The viridis colour at ``t`` in [0, 1] (linear interpolation between anchors)."""
    t = min(1.0, max(0.0, t))
    for (t0, c0), (t1, c1) in zip(_VIRIDIS, _VIRIDIS[1:], strict=False):
        if t <= t1:
            u = (t - t0) / (t1 - t0)
            return tuple(round(a + (b - a) * u) for a, b in zip(c0, c1, strict=True))  # type: ignore[return-value]
    return _VIRIDIS[-1][1]


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _text_width(s: str, size: float) -> float:
    # No font metrics offline: an average glyph is ~0.6 em in the sans-serif fonts browsers pick.
    return len(s) * size * 0.6


def _shorten(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _svg_open(width: float, height: float, kind: str, title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" data-kind="{kind}" role="img" '
            f'aria-label="{esc(title)}" width="{_f(width)}" height="{_f(height)}" '
            f'viewBox="0 0 {_f(width)} {_f(height)}" style="{FONT};font-size:12px">'
            f"<title>{esc(title)}</title>")


def heatmap(row_names: Sequence[str], col_names: Sequence[str], values: Sequence[Sequence[float | None]],
            *, title: str, vmin: float = 0.0, vmax: float = 1.0, col_notes: Sequence[str] | None = None,
            digits: int = 2) -> str:
    """A labelled heatmap: one cell per (row, column), its value printed in the cell.

    Missing values (``None``/NaN) are drawn hatched grey and labelled "–". Colours map
    ``vmin..vmax`` onto viridis; label text switches to black on light cells.
    """
    cell_w, cell_h = max(46.0, 8.0 * (digits + 3)), 26.0
    left = min(220.0, 12 + max((_text_width(r, 12) for r in row_names), default=40))
    col_labels = [_shorten(str(c), 24) for c in col_names]
    top = 24 + min(150.0, 10 + max((_text_width(c, 11) for c in col_labels), default=20) * 0.75)
    width = left + cell_w * len(col_names) + 80
    height = top + cell_h * len(row_names) + (18 if col_notes else 0) + 12
    out = [_svg_open(width, height, "heatmap", title),
           f'<text x="4" y="14" font-weight="600">{esc(title)}</text>']
    for j, c in enumerate(col_labels):
        x = left + cell_w * (j + 0.5)
        out.append(f'<text transform="translate({_f(x)},{_f(top - 6)}) rotate(-40)" font-size="11">'
                   f"<title>{esc(col_names[j])}</title>{esc(c)}</text>")
    for i, r in enumerate(row_names):
        y = top + cell_h * i
        out.append(f'<text x="{_f(left - 6)}" y="{_f(y + cell_h / 2 + 4)}" text-anchor="end">'
                   f"{esc(_shorten(str(r), 32))}</text>")
        for j, v in enumerate(values[i]):
            x = left + cell_w * j
            missing = v is None or not math.isfinite(v)
            if missing:
                fill, label, ink = "#e5e5e5", "–", "#555"
            else:
                t = 0.5 if vmax == vmin else (v - vmin) / (vmax - vmin)
                rgb = viridis(t)
                fill = _hex(rgb)
                label = f"{v:.{digits}f}"
                ink = "#000" if (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) > 140 else "#fff"
            tip = f"{r} · {col_names[j]}: {label}"
            out.append(f'<g class="cell"><title>{esc(tip)}</title>'
                       f'<rect x="{_f(x)}" y="{_f(y)}" width="{_f(cell_w - 1)}" height="{_f(cell_h - 1)}" '
                       f'fill="{fill}"/><text x="{_f(x + cell_w / 2)}" y="{_f(y + cell_h / 2 + 4)}" '
                       f'text-anchor="middle" fill="{ink}">{esc(label)}</text></g>')
    if col_notes:
        y = top + cell_h * len(row_names) + 14
        for j, note in enumerate(col_notes):
            out.append(f'<text x="{_f(left + cell_w * (j + 0.5))}" y="{_f(y)}" text-anchor="middle" '
                       f'font-size="10" fill="#555">{esc(note)}</text>')
    # Colour bar.
    bx = left + cell_w * len(col_names) + 18
    bh = max(cell_h * len(row_names), 60.0)
    steps = 20
    for s in range(steps):
        t = 1 - (s + 0.5) / steps
        out.append(f'<rect x="{_f(bx)}" y="{_f(top + bh * s / steps)}" width="12" '
                   f'height="{_f(bh / steps + 0.5)}" fill="{_hex(viridis(t))}"/>')
    out.append(f'<text x="{_f(bx + 16)}" y="{_f(top + 9)}" font-size="10">{esc(f"{vmax:g}")}</text>')
    out.append(f'<text x="{_f(bx + 16)}" y="{_f(top + bh)}" font-size="10">{esc(f"{vmin:g}")}</text>')
    out.append("</svg>")
    return "".join(out)


def _marker(shape: str, x: float, y: float, r: float, colour: str) -> str:
    if shape == "circle":
        return f'<circle cx="{_f(x)}" cy="{_f(y)}" r="{_f(r)}" fill="{colour}"'
    if shape == "square":
        return (f'<rect x="{_f(x - r)}" y="{_f(y - r)}" width="{_f(2 * r)}" height="{_f(2 * r)}" '
                f'fill="{colour}"')
    pts: list[tuple[float, float]]
    if shape == "triangle":
        pts = [(0, -1.25), (1.1, 0.7), (-1.1, 0.7)]
    elif shape == "triangle-down":
        pts = [(0, 1.25), (1.1, -0.7), (-1.1, -0.7)]
    elif shape == "diamond":
        pts = [(0, -1.3), (1.1, 0), (0, 1.3), (-1.1, 0)]
    elif shape == "star":
        pts = [(math.cos(a) * (1.4 if i % 2 == 0 else 0.6), math.sin(a) * (1.4 if i % 2 == 0 else 0.6))
               for i, a in enumerate(-math.pi / 2 + k * math.pi / 5 for k in range(10))]
    else:  # cross / plus: stroked, so they read as outlines next to filled shapes
        d = 1.0 if shape == "plus" else 0.75
        if shape == "plus":
            path = f"M{_f(x - r * d)},{_f(y)}H{_f(x + r * d)}M{_f(x)},{_f(y - r * d)}V{_f(y + r * d)}"
        else:
            path = (f"M{_f(x - r * d)},{_f(y - r * d)}L{_f(x + r * d)},{_f(y + r * d)}"
                    f"M{_f(x - r * d)},{_f(y + r * d)}L{_f(x + r * d)},{_f(y - r * d)}")
        return f'<path d="{path}" stroke="{colour}" stroke-width="2" fill="none"'
    poly = " ".join(f"{_f(x + px * r)},{_f(y + py * r)}" for px, py in pts)
    return f'<polygon points="{poly}" fill="{colour}"'


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    colour_key: str  # e.g. the class
    marker_key: str  # e.g. the condition
    tip: str = ""


def scatter(points: Sequence[Point], *, title: str, colour_title: str = "class",
            marker_title: str = "condition", width: float = 520, height: float = 440,
            caption: str = "") -> str:
    """A scatter plot: colour by ``colour_key``, marker shape by ``marker_key``, legend at the right.

    Axes carry no units (a 2-D projection's axes mean nothing by themselves), so none are drawn;
    a frame shows the plotting area. Each point has a tooltip (``tip``).
    """
    colours = list(dict.fromkeys(p.colour_key for p in points))
    markers = list(dict.fromkeys(p.marker_key for p in points))
    cmap = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(colours)}
    mmap = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(markers)}
    legend_w = min(190.0, 40 + max((_text_width(s, 11) for s in colours + markers), default=40))
    plot_w, top, pad = width - legend_w, 26.0, 10.0
    plot_h = height - top - (18 if caption else 6)
    out = [_svg_open(width, height, "scatter", title),
           f'<text x="4" y="15" font-weight="600">{esc(title)}</text>',
           f'<rect x="2" y="{_f(top)}" width="{_f(plot_w - 8)}" height="{_f(plot_h)}" fill="#fbfbfb" '
           'stroke="#ccc"/>']
    if points:
        xs = [p.x for p in points]
        ys = [p.y for p in points]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        sx = (plot_w - 8 - 2 * pad) / ((x1 - x0) or 1.0)
        sy = (plot_h - 2 * pad) / ((y1 - y0) or 1.0)
        r = 3.4 if len(points) <= 400 else 2.6
        # Draw in marker order so the clean condition sits underneath overlaid points.
        for m in markers:
            out.append(f'<g class="series" data-marker="{esc(m)}" fill-opacity="0.8">')
            for p in points:
                if p.marker_key != m:
                    continue
                px = 2 + pad + (p.x - x0) * sx
                py = top + pad + (y1 - p.y) * sy
                out.append(_marker(mmap[m], px, py, r, cmap[p.colour_key]) +
                           (f"><title>{esc(p.tip)}</title></{_tag(mmap[m])}>" if p.tip else "/>"))
            out.append("</g>")
    lx, ly = plot_w, top + 4
    out.append(f'<text x="{_f(lx)}" y="{_f(ly + 8)}" font-weight="600" font-size="11">'
               f"{esc(colour_title)}</text>")
    ly += 14
    for c in colours:
        out.append(f'<g class="legend-item"><rect x="{_f(lx)}" y="{_f(ly)}" width="10" height="10" '
                   f'fill="{cmap[c]}"/><text x="{_f(lx + 15)}" y="{_f(ly + 9)}" font-size="11">'
                   f"{esc(_shorten(c, 26))}</text></g>")
        ly += 15
    if len(colours) > len(PALETTE):
        out.append(f'<text x="{_f(lx)}" y="{_f(ly + 9)}" font-size="10" fill="#a00">colours repeat</text>')
        ly += 15
    ly += 8
    out.append(f'<text x="{_f(lx)}" y="{_f(ly + 8)}" font-weight="600" font-size="11">'
               f"{esc(marker_title)}</text>")
    ly += 14
    for m in markers:
        out.append('<g class="legend-item">' + _marker(mmap[m], lx + 5, ly + 5, 4.2, "#444") + "/>" +
                   f'<text x="{_f(lx + 15)}" y="{_f(ly + 9)}" font-size="11">'
                   f"{esc(_shorten(m, 26))}</text></g>")
        ly += 15
    if caption:
        out.append(f'<text x="4" y="{_f(height - 5)}" font-size="10" fill="#555">{esc(caption)}</text>')
    out.append("</svg>")
    return "".join(out)


def _tag(shape: str) -> str:
    if shape in ("cross", "plus"):
        return "path"
    return {"circle": "circle", "square": "rect"}.get(shape, "polygon")


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    low: float | None = None  # error whisker ends (e.g. a 95% CI); None draws no whisker
    high: float | None = None
    colour_key: str = ""
    note: str = ""  # printed right of the bar (e.g. "p = 0.01 *")
    ref: float | None = None  # a reference value (e.g. a baseline), drawn as a dashed mark


def bar_chart(bars: Sequence[Bar], *, title: str, axis_label: str = "", width: float = 760,
              digits: int = 3, colour_title: str = "") -> str:
    """Horizontal bars from zero with error whiskers; negative values extend left of a zero line."""
    keys = list(dict.fromkeys(b.colour_key for b in bars))
    cmap = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(keys)}
    row_h, top = 24.0, 30.0
    left = min(280.0, 0.4 * width, 14 + max((_text_width(b.label, 12) for b in bars), default=40))
    label_chars = max(8, int((left - 14) / _text_width("x", 12)))
    right = 150.0
    finite = [v for b in bars for v in (b.value, b.low, b.high, b.ref) if v is not None and math.isfinite(v)]
    lo, hi = min([0.0, *finite]), max([0.0, *finite])
    if hi == lo:
        hi = lo + 1.0
    span = hi - lo
    lo, hi = lo - 0.04 * span * (lo < 0), hi + 0.04 * span
    legend_h = 18.0 if len(keys) > 1 else 0.0
    height = top + row_h * len(bars) + 34 + legend_h
    plot_w = width - left - right
    out = [_svg_open(width, height, "bars", title),
           f'<text x="4" y="15" font-weight="600">{esc(title)}</text>']

    def sx(v: float) -> float:
        return left + (v - lo) / (hi - lo) * plot_w

    axis_y = top + row_h * len(bars)
    for t in _ticks(lo, hi):
        out.append(f'<line x1="{_f(sx(t))}" x2="{_f(sx(t))}" y1="{_f(top - 4)}" y2="{_f(axis_y)}" '
                   f'stroke="{"#555" if t == 0 else "#e3e3e3"}"/>'
                   f'<text x="{_f(sx(t))}" y="{_f(axis_y + 13)}" text-anchor="middle" font-size="10">'
                   f"{esc(f'{t:g}')}</text>")
    if axis_label:
        out.append(f'<text x="{_f(left + plot_w / 2)}" y="{_f(axis_y + 27)}" text-anchor="middle" '
                   f'font-size="11">{esc(axis_label)}</text>')
    for i, b in enumerate(bars):
        y = top + row_h * i
        ok = math.isfinite(b.value)
        x0, x1 = (sx(min(0.0, b.value)), sx(max(0.0, b.value))) if ok else (sx(0), sx(0))
        tip = f"{b.label}: {b.value:.{digits}f}" + (
            f" [{b.low:.{digits}f}, {b.high:.{digits}f}]" if b.low is not None and b.high is not None else "")
        out.append(f'<g class="bar"><title>{esc(tip)}</title>'
                   f'<text x="{_f(left - 6)}" y="{_f(y + row_h / 2 + 4)}" text-anchor="end">'
                   f"{esc(_shorten(b.label, label_chars))}</text>"
                   f'<rect x="{_f(x0)}" y="{_f(y + 4)}" width="{_f(max(x1 - x0, 0.5))}" '
                   f'height="{_f(row_h - 8)}" fill="{cmap[b.colour_key]}" fill-opacity="0.85"/>')
        if b.low is not None and b.high is not None and math.isfinite(b.low) and math.isfinite(b.high):
            cy = y + row_h / 2
            xl, xh = _f(sx(b.low)), _f(sx(b.high))
            out.append(f'<path class="whisker" d="M{xl},{_f(cy)}H{xh}'
                       f'M{xl},{_f(cy - 5)}V{_f(cy + 5)}M{xh},{_f(cy - 5)}V{_f(cy + 5)}" '
                       'stroke="#111" stroke-width="1.4" fill="none"/>')
        if b.ref is not None and math.isfinite(b.ref):
            out.append(f'<path class="ref" d="M{_f(sx(b.ref))},{_f(y + 1)}V{_f(y + row_h - 1)}" '
                       'stroke="#c00" stroke-width="2" stroke-dasharray="3,2"><title>'
                       f"baseline {b.ref:.{digits}f}</title></path>")
        label = f"{b.value:.{digits}f}" if ok else "n/a"
        out.append(f'<text x="{_f(left + plot_w + 6)}" y="{_f(y + row_h / 2 + 4)}" font-size="11">'
                   f"{esc(label + ('  ' + b.note if b.note else ''))}</text></g>")
    if len(keys) > 1:
        lx, ly = left, height - 8
        if colour_title:
            out.append(f'<text x="{_f(lx)}" y="{_f(ly)}" font-size="11" font-weight="600">'
                       f"{esc(colour_title)}:</text>")
            lx += _text_width(colour_title, 11) + 14
        for k in keys:
            out.append(f'<rect x="{_f(lx)}" y="{_f(ly - 9)}" width="10" height="10" fill="{cmap[k]}"/>'
                       f'<text x="{_f(lx + 14)}" y="{_f(ly)}" font-size="11">{esc(k)}</text>')
            lx += 28 + _text_width(k, 11)
    out.append("</svg>")
    return "".join(out)


def _ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2, 5 × 10^k steps), always including 0 when in range."""
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(s * mag for s in (1, 2, 5, 10) if s * mag >= raw)
    first = math.ceil(lo / step) * step
    out, t = [], first
    while t <= hi + 1e-12:
        out.append(round(t, 12) + 0.0)
        t += step
    return out
