"""PDF/A-3b rendering of the HTML report with WeasyPrint.

The HTML is self-contained, so the URL fetcher refuses every URL except ``data:`` URIs: a report
can never make WeasyPrint read a local file or reach the network. ``results.json`` is embedded as
an associated file (AFRelationship /Data). With the same HTML, attachment and dates, the bytes are
the same: the dates come from ``SOURCE_DATE_EPOCH`` when set, else from ``created``.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from auditor.errors import AuditorError

PAGE_SIZES = {"a4": "A4", "letter": "Letter"}


class ExternalResourceRefused(AuditorError):
    """The report tried to load something that is not a data: URI."""


def _weasyprint():
    # Imported lazily: WeasyPrint pulls in Pango and takes a while to import.
    import weasyprint
    from weasyprint.urls import FatalURLFetchingError, URLFetcher

    return weasyprint, URLFetcher, FatalURLFetchingError


def data_only_fetcher():
    """A WeasyPrint URL fetcher that serves data: URIs and raises for every other URL."""
    _, URLFetcher, _ = _weasyprint()

    class DataOnlyURLFetcher(URLFetcher):
        def __init__(self) -> None:
            super().__init__(allowed_protocols=("data",), allow_redirects=False, fail_on_errors=True)

        def fetch(self, url, headers=None):
            if not str(url).lower().startswith("data:"):
                raise ExternalResourceRefused(
                    f"refused to fetch {str(url)[:200]!r}: the report may only embed data: URIs", where="report")
            return super().fetch(url, headers)

    return DataOnlyURLFetcher()


def normalise_page_size(page_size: str) -> str:
    size = PAGE_SIZES.get(str(page_size).strip().lower())
    if size is None:
        raise AuditorError(f"unknown page size {page_size!r}; expected A4 or Letter", where="page_size")
    return size


def _document_date(created: datetime | None) -> datetime:
    sde = os.environ.get("SOURCE_DATE_EPOCH")
    if sde:
        try:
            return datetime.fromtimestamp(int(sde), tz=timezone.utc)
        except ValueError as exc:
            raise AuditorError(f"expected an integer number of seconds, got {sde!r}", where="SOURCE_DATE_EPOCH") from exc
    if created is not None:
        return created if created.tzinfo else created.replace(tzinfo=timezone.utc)
    return datetime.now(timezone.utc)


def parse_iso(value: object) -> datetime | None:
    """An ISO-8601 timestamp (a trailing Z allowed), or None when it is not one."""
    if not isinstance(value, str):
        return None
    try:
        dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def _dedupe_associated_files(document, pdf) -> None:
    """WeasyPrint 70 lists each attachment twice in the catalog's /AF array; keep one of each."""
    af = pdf.catalog.get("AF")
    if af:
        seen = []
        for ref in af:
            if ref not in seen:
                seen.append(ref)
        af[:] = seen


def pdf_bytes(html: str, page_size: str = "A4", *, attachment: bytes | None = None,
              attachment_name: str = "results.json", created: datetime | None = None) -> bytes:
    """Render `html` to PDF/A-3b bytes, with `attachment` embedded under `attachment_name`."""
    weasyprint, _, FatalURLFetchingError = _weasyprint()
    size = normalise_page_size(page_size)
    when = _document_date(created).astimezone(timezone.utc).replace(tzinfo=None)
    fetcher = data_only_fetcher()
    attachments = []
    if attachment is not None:
        attachments.append(weasyprint.Attachment(
            string=attachment, url_fetcher=fetcher, name=attachment_name,
            description="Machine-readable audit results rendered in this report",
            created=when, modified=when, relationship="Data"))
    page_css = weasyprint.CSS(string=f"@page {{ size: {size}; }}", url_fetcher=fetcher)
    try:
        doc = weasyprint.HTML(string=html, url_fetcher=fetcher, base_url=None, media_type="print")
        return doc.write_pdf(stylesheets=[page_css], attachments=attachments, pdf_variant="pdf/a-3b",
                             finisher=_dedupe_associated_files)
    except FatalURLFetchingError as exc:
        cause = exc.__cause__
        if isinstance(cause, AuditorError):
            raise cause from None
        raise ExternalResourceRefused(str(exc), where="report") from exc


def atomic_write(path: Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def render_pdf(html: str, path: Path, page_size: str = "A4", *, attachment: bytes | None = None,
               created: datetime | None = None) -> Path:
    """Render `html` to a PDF/A-3b file at `path` (written atomically); `attachment` becomes results.json."""
    return atomic_write(Path(path), pdf_bytes(html, page_size, attachment=attachment, created=created))
