"""HTML building blocks: MathML from sympy, tables from pandas, data: URIs, and the jinja2 renderer.

Everything here is deterministic (no timestamps, sorted keys) and offline: the
only URIs produced are ``data:`` URIs.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
import sympy as sp
from sympy.printing.mathml import mathml

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates"
#: Raw CSVs up to this size are plain ``data:`` links (browsers cap data: URIs near 2 MB); larger
#: ones are embedded gzip-compressed and decompressed on click by the page's script.
MAX_EMBEDDED_CSV_BYTES = 1_500_000
#: Compressed CSVs larger than this are not embedded at all (the page would become unwieldy).
MAX_EMBEDDED_GZIP_BYTES = 25_000_000


def expression_record(name: str, expression: sp.Basic) -> dict[str, str]:
    """A derived expression as {name, text, mathml}; MathML is '' where sympy cannot print it."""
    try:
        markup = mathml(expression, printer="presentation")
    except Exception as error:  # some objects (e.g. relational chains) have no presentation form
        log.warning("no MathML for %s: %s", name, error)
        markup = ""
    return {"name": name, "text": str(expression), "mathml": markup}


def data_uri(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """The frame as CSV (12 significant digits, no index, '\\n' line ends)."""
    return frame.to_csv(index=False, float_format="%.12g", lineterminator="\n").encode("utf-8")


def csv_download(frame: pd.DataFrame, filename: str, title: str) -> dict[str, Any]:
    """A download entry for the templates' ``download`` macro.

    Up to :data:`MAX_EMBEDDED_CSV_BYTES` the CSV is a ``data:text/csv`` link (works without
    JavaScript). Larger, it is embedded gzip-compressed (``gzip`` key, base64; ``mtime=0`` so the
    bytes are deterministic) and the page's script decompresses it into a download on click.
    """
    payload = csv_bytes(frame)
    entry = {"title": title, "filename": filename, "rows": len(frame), "columns": len(frame.columns),
             "bytes": len(payload), "uri": "", "gzip": "", "element_id": "", "note": ""}
    if len(payload) <= MAX_EMBEDDED_CSV_BYTES:
        entry["uri"] = data_uri(payload, "text/csv")
        return entry
    packed = gzip.compress(payload, compresslevel=9, mtime=0)
    if len(packed) > MAX_EMBEDDED_GZIP_BYTES:
        entry["note"] = f"{len(payload) / 1e6:.1f} MB: too large to embed; it is results.csv in the result folder"
        return entry
    entry["gzip"] = base64.b64encode(packed).decode("ascii")
    entry["element_id"] = "csv-" + re.sub(r"[^A-Za-z0-9_-]", "-", filename)
    entry["note"] = (f"{len(payload) / 1e6:.1f} MB of CSV embedded gzip-compressed ({len(packed) / 1e6:.1f} MB); "
                     "the link decompresses it in the browser")
    return entry


def format_value(value: Any) -> str:
    """Compact, stable text for a number or other JSON value."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Nested dict -> sorted (dotted key, formatted value) rows."""
    rows: list[tuple[str, str]] = []
    for key in sorted(mapping, key=str):
        value = mapping[key]
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            rows.extend(flatten(value, name + "."))
        else:
            rows.append((name, format_value(value)))
    return rows


def table_html(frame: pd.DataFrame, *, max_rows: int = 60) -> str:
    """A pandas table as HTML (first ``max_rows`` rows), numbers to 6 significant digits."""
    shown = frame.head(max_rows)
    markup = shown.to_html(
        index=False, border=0, classes="data", float_format=lambda x: f"{x:.6g}", na_rep="—", escape=True
    )
    if len(frame) > max_rows:
        markup += f'<p class="note">first {max_rows} of {len(frame)} rows; the full table is in the CSV download.</p>'
    return markup


def environment() -> jinja2.Environment:
    """The jinja2 environment of the report templates (autoescaped, strict about undefined names)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pretty_json"] = lambda value: json.dumps(value, indent=2, sort_keys=True, default=str)
    env.filters["badge_class"] = lambda status: "badge-" + status.replace(" ", "-")
    return env


def render(template: str, **context: Any) -> str:
    """Render one template with the given context."""
    return environment().get_template(template).render(**context)
