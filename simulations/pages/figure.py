"""The report's figures, as deterministic inline SVG (line plots) or PNG data URIs (dense plots).

Determinism: a fixed ``svg.hashsalt``, no date or creator metadata, PNG without
the Software tag, fixed sizes and dpi, sorted data. The SVG is inlined in HTML5,
so its XML header, doctype, metadata block and namespace declarations (which
contain w3.org URLs, not fetched but flagged by a network scan) are removed.

Each figure also returns the (small, aggregated) table it plots, embedded in the
page as a CSV download.
"""

from __future__ import annotations

import base64
import io
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

log = logging.getLogger(__name__)

STYLE = {
    "svg.hashsalt": "dropkey-lab",
    "svg.fonttype": "path",  # glyphs as paths: no font files needed offline
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "savefig.facecolor": "white",
    "figure.dpi": 100,
    "font.size": 9,
}
PALETTE = sns.color_palette("colorblind", 10)


def data_uri(payload: bytes, mime: str) -> str:
    """A ``data:`` URI of ``payload`` (base64)."""
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


@dataclass(frozen=True)
class Figure:
    slug: str
    title: str
    caption: str
    kind: str  # "svg" or "png"
    markup: str  # inline <svg> or <img src="data:...">
    data: pd.DataFrame


def _svg_markup(figure: matplotlib.figure.Figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    text = re.sub(r"<\?xml[^>]*\?>\s*", "", text)
    text = re.sub(r"<!DOCTYPE[^>]*>\s*", "", text, flags=re.S)
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text, flags=re.S)
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)
    return text.strip()


def _png_markup(figure: matplotlib.figure.Figure, alt: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    return f'<img alt="{alt}" src="{data_uri(buffer.getvalue(), "image/png")}">'


def make_figure(
    slug: str, title: str, caption: str, kind: str, data: pd.DataFrame, draw: Callable[[plt.Figure], None],
    size: tuple[float, float] = (7.0, 3.6),
) -> Figure:
    """Draw with ``draw(fig)`` under the report style and serialise as ``kind``."""
    with plt.rc_context(STYLE), sns.axes_style("whitegrid"):
        figure = plt.figure(figsize=size, layout="constrained")
        try:
            draw(figure)
            markup = _svg_markup(figure) if kind == "svg" else _png_markup(figure, title)
        finally:
            plt.close(figure)
    return Figure(slug, title, caption, kind, markup, data.reset_index(drop=True))
