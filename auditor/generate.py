"""`auditor generate` as a library call: audit → gates → report files → (signature).

Everything is written into a temporary folder beside the output folder and moved into place
only when all of it succeeded, so a failure leaves no half-written report.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .audit import AuditConfig, AuditResult, Progress, estimate
from .errors import AuditorError
from .pipeline import load_pipeline

FORMATS = ("html", "pdf", "json")
OUTPUT_NAMES = ("report.html", "report.pdf", "results.json", "manifest.json", "manifest.sig", "attestation.dsse.json")


@dataclass
class GenerateConfig:
    """What to write and how. ``formats``: any of html, pdf, json. ``page_size``: A4 or Letter."""

    out_dir: Path = Path("report")
    formats: tuple[str, ...] = FORMATS
    page_size: str = "A4"
    sign_key: Path | None = None
    passphrase: bytes | None = None
    audit: AuditConfig = field(default_factory=AuditConfig)

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise AuditorError(f"format {bad[0] if bad else '(none)'!r}; expected one or more of {', '.join(FORMATS)}",
                               where="--format")
        if self.page_size not in ("A4", "Letter"):
            raise AuditorError(f"page size {self.page_size!r}; expected A4 or Letter", where="--page-size")
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise AuditorError("exists and is not a folder; expected a folder for the report files", where="--out")
        parent = next((p for p in self.out_dir.absolute().parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise AuditorError(f"{parent} is not a folder, so the report folder cannot be created there",
                               where="--out")
        if self.out_dir.is_dir():
            clash = [n for n in OUTPUT_NAMES if (self.out_dir / n).is_dir()]
            if clash:
                raise AuditorError(f"{self.out_dir / clash[0]} is a folder; expected it to be free for a report "
                                   "file", where="--out")
        if self.sign_key is not None and not Path(self.sign_key).is_file():
            raise AuditorError("file not found (expected an Ed25519 private key PEM made by `auditor keygen`)",
                               where=str(self.sign_key))


@dataclass
class GenerateOutcome:
    result: AuditResult
    files: dict[str, Path]
    gates: list[dict]
    decision: str

    @property
    def exit_code(self) -> int:
        return 3 if any(g["status"] == "FAIL" for g in self.gates) else 0


def _inputs_table(result: AuditResult) -> list[dict]:
    root = result.pipeline.root
    rows = []
    for r in result.inputs:
        try:
            rel = r.path.resolve().relative_to(root).as_posix()
        except ValueError:
            rel = str(r.path.resolve())
        rows.append({"role": r.role, "path": rel, "sha256": r.sha256, "bytes": r.bytes})
    return rows


def report_id(inputs: list[dict], version: str) -> str:
    """A stable identifier: the same inputs and tool version give the same ID."""
    h = hashlib.sha256(version.encode())
    for r in sorted(inputs, key=lambda r: r["path"]):
        h.update(f"{r['path']}\0{r['sha256']}\n".encode())
    return "AUD-" + h.hexdigest()[:12].upper()


def generate(pipeline_path: str | Path, config: GenerateConfig | None = None,
             progress: Progress | None = None) -> GenerateOutcome:
    from .gates import decision as gate_decision
    from .gates import evaluate_gates
    from .report import render_report

    config = config or GenerateConfig()
    pipeline = load_pipeline(pipeline_path)
    try:
        config.out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AuditorError(f"cannot create {config.out_dir.parent} ({exc.strerror})", where="--out") from None
    result = estimate(pipeline, config.audit, progress)
    data = result.data
    gates = evaluate_gates(pipeline.policy, data)
    data["gates"] = gates
    data["decision"] = gate_decision(gates)
    data["inputs"] = _inputs_table(result)
    data["inputs_root"] = str(pipeline.root)
    data["report_id"] = report_id(data["inputs"], data["auditor_version"])

    out = config.out_dir
    tmp = Path(tempfile.mkdtemp(prefix=".auditor-", dir=out.parent))
    try:
        if progress:
            progress("rendering the report", 0.98)
        files = render_report(data, tmp, formats=config.formats, page_size=config.page_size, images=result.images)
        if config.sign_key is not None:
            from .signing import sign_report_dir

            if progress:
                progress("signing", 0.99)
            files["manifest"] = sign_report_dir(tmp, files, data["inputs"], data, config.sign_key, config.passphrase)
        out.mkdir(parents=True, exist_ok=True)
        written = sorted(tmp.iterdir())
        for item in written:
            os.replace(item, out / item.name)
        for name in set(OUTPUT_NAMES) - {p.name for p in written}:  # a previous run's files must not linger
            (out / name).unlink(missing_ok=True)
        files = {k: out / Path(v).name for k, v in files.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return GenerateOutcome(result=result, files=files, gates=gates, decision=data["decision"])
