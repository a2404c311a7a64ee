"""HTML building blocks: MathML from sympy, tables from pandas, data: URIs, and the jinja2 renderer.

Everything here is deterministic (no timestamps, sorted keys) and offline: the
only URIs produced are ``data:`` URIs.
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
import sympy as sp
from sympy.printing.mathml import mathml

from dropkey.storage import csv_text
from simulations.pages.figure import data_uri

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates"
#: Raw CSVs up to this size are plain ``data:`` links (browsers cap data: URIs near 2 MB); larger
#: ones are embedded gzip-compressed and decompressed on click by the page's script.
MAX_EMBEDDED_CSV_BYTES = 1_500_000
#: Every page stays below this size; its embedded data share :data:`DOWNLOAD_BUDGET_BYTES` of it.
MAX_PAGE_BYTES = 3_000_000
DOWNLOAD_BUDGET_BYTES = 2_000_000
#: Files too large for their page are written next to the pages, in this folder, and linked.
DATA_FOLDER = "data"
#: Columns whose values are whole units (a problem, a row, a repeat) for cutting a sample of a frame.
SAMPLE_UNITS = ("problem", "row", "repeat", "seed")


def expression_record(name: str, expression: sp.Basic) -> dict[str, str]:
    """A derived expression as {name, text, mathml}; MathML is '' where sympy cannot print it."""
    try:
        markup = mathml(expression, printer="presentation")
    except Exception as error:  # some objects (e.g. relational chains) have no presentation form
        log.warning("no MathML for %s: %s", name, error)
        markup = ""
    return {"name": name, "text": str(expression), "mathml": markup}


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """The frame as CSV in the suite's one format (:func:`dropkey.storage.csv_text`), UTF-8."""
    return csv_text(frame).encode("utf-8")


class PageTooLarge(RuntimeError):
    """A rendered page exceeds :data:`MAX_PAGE_BYTES` (a report a reader cannot open)."""


class Downloads:
    """The data downloads of one page, within the page's byte budget.

    A CSV that fits what is left of the budget is embedded (a ``data:`` link, or gzip-compressed
    and decompressed on click); one that does not is written gzip-compressed to ``data/`` next to
    the pages and linked (``files`` holds what to write), and, where the frame has whole units
    (:data:`SAMPLE_UNITS`), a sample of its first units that fits is embedded too.
    """

    def __init__(self, budget: int = DOWNLOAD_BUDGET_BYTES) -> None:
        self.left = int(budget)
        self.files: dict[str, bytes] = {}  # relative path -> bytes to write

    def _embed(self, payload: bytes, entry: dict[str, Any]) -> bool:
        if len(payload) <= MAX_EMBEDDED_CSV_BYTES and 4 * len(payload) // 3 + 64 <= self.left:
            entry["uri"] = data_uri(payload, "text/csv")
            self.left -= len(entry["uri"])
            return True
        packed = gzip.compress(payload, compresslevel=9, mtime=0)
        encoded = base64.b64encode(packed).decode("ascii")
        if len(encoded) + 256 > self.left:
            return False
        entry["gzip"] = encoded
        entry["element_id"] = "csv-" + re.sub(r"[^A-Za-z0-9_-]", "-", entry["filename"])
        entry["note"] = (f"{len(payload) / 1e6:.1f} MB of CSV embedded gzip-compressed ({len(packed) / 1e6:.1f} MB); "
                         "the link decompresses it in the browser")
        self.left -= len(encoded)
        return True

    def add(self, frame: pd.DataFrame, filename: str, title: str) -> dict[str, Any]:
        """A download entry for the templates' ``download`` macro (see the class doc)."""
        payload = csv_bytes(frame)
        entry = {"title": title, "filename": filename, "rows": len(frame), "columns": len(frame.columns),
                 "bytes": len(payload), "uri": "", "gzip": "", "element_id": "", "note": "", "file": "",
                 "sample": None}
        if self._embed(payload, entry):
            return entry
        path = f"{DATA_FOLDER}/{filename}.gz"
        self.files[path] = gzip.compress(payload, compresslevel=9, mtime=0)
        entry["file"] = path
        entry["note"] = f"{len(payload) / 1e6:.1f} MB of CSV: too large for the page; a gzip file next to it"
        sample = _unit_sample(frame, self.left // 2)
        if sample is not None:
            column, count = sample
            part = frame[frame[column].isin(sorted(frame[column].unique())[:count])]
            sample_entry = {"title": f"the first {count} {column}s", "filename": f"sample-{filename}",
                            "rows": len(part), "columns": len(part.columns), "uri": "", "gzip": "",
                            "element_id": "", "note": "", "file": "", "sample": None}
            if self._embed(csv_bytes(part), sample_entry):
                entry["sample"] = sample_entry
        return entry


def _unit_sample(frame: pd.DataFrame, budget: int) -> tuple[str, int] | None:
    """(unit column, number of units) of the largest sample of whole units whose gzip CSV fits ``budget``."""
    column = next((c for c in SAMPLE_UNITS if c in frame.columns), None)
    if column is None or budget <= 0:
        return None
    units = sorted(frame[column].unique())
    per_unit = len(gzip.compress(csv_bytes(frame), compresslevel=6, mtime=0)) / max(len(units), 1)
    count = min(len(units), int(0.7 * budget / max(per_unit, 1.0)))
    return (column, count) if count >= 1 else None


def csv_download(frame: pd.DataFrame, filename: str, title: str) -> dict[str, Any]:
    """A download entry on its own budget (one CSV per page; see :class:`Downloads`)."""
    return Downloads().add(frame, filename, title)


def check_page_size(name: str, text: str) -> None:
    """PageTooLarge naming the page when it exceeds :data:`MAX_PAGE_BYTES`."""
    size = len(text.encode("utf-8"))
    if size > MAX_PAGE_BYTES:
        raise PageTooLarge(
            f"page {name} is {size / 1e6:.1f} MB, over the {MAX_PAGE_BYTES / 1e6:.0f} MB a reader can open"
        )


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
