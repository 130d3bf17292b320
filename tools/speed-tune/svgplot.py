"""Minimal SVG line charts for the training and tuning records (no plotting library needed)."""

from xml.sax.saxutils import escape

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]


def _ticks(lo, hi, n=5):
    if hi <= lo:
        hi = lo + 1.0
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _fmt(v):
    if abs(v) >= 1e6:
        return "%.1fM" % (v / 1e6)
    if abs(v) >= 1e3:
        return "%.0fk" % (v / 1e3)
    if abs(v) >= 10 or v == int(v):
        return "%.0f" % v
    return "%.2f" % v


def line_chart(path, title, xlabel, ylabel, series, width=640, height=400, xticks=None, styles=None):
    """series: [(name, [(x, y), ...])]; xticks: the x values to label (default 5 even ones);
    styles: per series (colour, dashed). Writes one SVG file."""
    xs = [x for _, pts in series for x, _ in pts] or [0, 1]
    ys = [y for _, pts in series for _, y in pts] or [0, 1]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1
    left, right, top, bottom = 70, 20, 40, 50
    pw, ph = width - left - right, height - top - bottom

    def px(x):
        return left + (x - x0) / (x1 - x0) * pw

    def py(y):
        return top + ph - (y - y0) / (y1 - y0) * ph

    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" '
           'font-family="sans-serif" font-size="12">' % (width, height, width, height),
           '<rect width="100%" height="100%" fill="white"/>',
           '<text x="%d" y="22" font-size="15">%s</text>' % (left, escape(title))]
    for v in _ticks(y0, y1):
        out.append('<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#ddd"/>' % (left, left + pw, py(v), py(v)))
        out.append('<text x="%d" y="%.1f" text-anchor="end">%s</text>' % (left - 6, py(v) + 4, _fmt(v)))
    for v in xticks or _ticks(x0, x1):
        out.append('<text x="%.1f" y="%d" text-anchor="middle">%s</text>' % (px(v), top + ph + 18, _fmt(v)))
    out.append('<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#333"/>' % (left, top, pw, ph))
    out.append('<text x="%d" y="%d" text-anchor="middle">%s</text>' % (left + pw // 2, height - 10, escape(xlabel)))
    out.append('<text transform="translate(16 %d) rotate(-90)" text-anchor="middle">%s</text>' %
               (top + ph // 2, escape(ylabel)))
    for i, (name, pts) in enumerate(series):
        c, dashed = styles[i] if styles else (COLOURS[i % len(COLOURS)], False)
        if pts:
            d = " ".join("%s%.1f %.1f" % ("M" if j == 0 else "L", px(x), py(y)) for j, (x, y) in enumerate(pts))
            out.append('<path d="%s" fill="none" stroke="%s" stroke-width="2"%s/>' %
                       (d, c, ' stroke-dasharray="6 4"' if dashed else ""))
        out.append('<text x="%d" y="%d" fill="%s">%s</text>' % (left + pw - 150, top + 18 + 16 * i, c, escape(name)))
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
