"""Accountability report: self-contained HTML, PDF/A-3b with results.json attached, and results.json.

    from auditor.report import render_report
    paths = render_report(results, Path("out"))   # {"html": .../report.html, "pdf": ..., "json": ...}

Everything is rendered in memory first and each file is then written atomically, so a failure
leaves no new or half-written file behind.
"""

from __future__ import annotations

import pathlib
from typing import Iterable

import numpy

from auditor.errors import AuditorError

from .html import SECTIONS, _dumps, build_context, render_html, results_json_bytes, sanitize
from .pdf import atomic_write, data_only_fetcher, normalise_page_size, parse_iso, pdf_bytes, render_pdf

__all__ = ["render_report", "render_html", "render_pdf", "results_json_bytes", "data_only_fetcher",
           "build_context", "SECTIONS", "FILENAMES"]

FILENAMES = {"html": "report.html", "pdf": "report.pdf", "json": "results.json"}


def render_report(results: dict, out_dir: pathlib.Path, *, formats: Iterable[str] = ("html", "pdf", "json"),
                  page_size: str = "A4", images: dict[str, numpy.ndarray] | None = None) -> dict[str, pathlib.Path]:
    """Write report.html, report.pdf and results.json (those in `formats`) to `out_dir`.

    `images[behavior]` is an array [N, H, W] with values in 0..1, aligned with that behaviour's
    per_example ids, shown as thumbnails in the drill-down. Returns the paths by format.
    """
    formats = tuple(formats)
    unknown = sorted(set(formats) - set(FILENAMES))
    if unknown or not formats:
        raise AuditorError(f"unknown report format(s) {unknown or formats!r}; expected some of html, pdf, json",
                           where="formats")
    if "pdf" in formats:
        normalise_page_size(page_size)  # fail before the slow part
    clean = sanitize(results)
    data = _dumps(clean)
    out: dict[str, bytes] = {}
    if "html" in formats or "pdf" in formats:
        html = render_html(clean, images=images, json_bytes=data)
        if "html" in formats:
            out["html"] = html.encode("utf-8")
        if "pdf" in formats:
            out["pdf"] = pdf_bytes(html, page_size, attachment=data, created=parse_iso(clean.get("generated_at")))
    if "json" in formats:
        out["json"] = data
    out_dir = pathlib.Path(out_dir)
    return {fmt: atomic_write(out_dir / FILENAMES[fmt], out[fmt]) for fmt in formats}
