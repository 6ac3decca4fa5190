"""HTML accountability report: a view model built from the results dict, rendered by Jinja2.

The template (``templates/report.html.j2``) only lays out what :func:`build_context` prepared:
every number is formatted here, every string is escaped by Jinja2's autoescape, and the only
markup inserted unescaped is the CSS file and the chart SVG produced by :mod:`.charts`
(which refuses any script or external reference).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import yaml
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup

from auditor.errors import AuditorError
from auditor.fidelity import FIRST_ORDER, judged_by_diagnostics
from auditor.jsonsafe import sanitize  # re-exported as auditor.report.sanitize

from . import charts

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "templates"
COMPLIANCE_FILE = Path(__file__).resolve().parents[1] / "compliance.yaml"

#: (anchor id, title) of every section, in report order. compliance.yaml refers to these ids.
SECTIONS: tuple[tuple[str, str], ...] = (
    ("cover", "Cover"),
    ("summary", "Executive summary"),
    ("timeline", "Pipeline timeline"),
    ("counterfactuals", "Counterfactual tables"),
    ("fidelity", "Fidelity against retraining"),
    ("charts", "Charts"),
    ("drilldown", "Per-example drill-down"),
    ("methodology", "Methodology and assumptions"),
    ("diagnostics", "Diagnostics"),
    ("reproducibility", "Reproducibility manifest"),
    ("compliance", "Compliance mapping"),
    ("gates", "Release gates"),
    ("signoff", "Sign-off"),
)
SECTION_IDS = frozenset(s for s, _ in SECTIONS)

# Forms tried, in order, when the primary estimator has no value (e.g. linear on accuracy).
# The naive checkpoint difference is a baseline, never a fallback.
_FALLBACK = ("shifted", "midpoint", "linear")
TOP_K = 5
#: Plain-words descriptions of the curvature-aware estimators (ESTIMATORS.md 3.2), when present.
TIER_TEXT = {
    "exact": "curvature-aware propagation (the accuracy tier; it costs about as much as retraining): the stage's "
             "change is carried through every later step on that step's own batch, at the nearest recorded "
             "checkpoint, with how the loss gradient responds to the change. ",
    "spectral": "the cheap curvature tier: the Hessian is held fixed on each segment of later training and "
                "only its largest eigen-directions are propagated; the rest follows the AA recurrence.",
}
#: How the exact tier's gradient response is computed, by ``tiers.exact.curvature`` in results.json.
CURVATURE_TEXT = {
    "secant": "That response is the difference of the loss gradients with and without the change (the Hessian "
              "averaged along the change): identical to a Hessian-vector product on quadratic losses, and it keeps "
              "the loss's nonlinearity along the change, which decides early stages.",
    "hessian": "That response is a Hessian-vector product at the checkpoint (first order in the change).",
}


def _tier_texts(results: Mapping) -> dict[str, str]:
    """TIER_TEXT with the exact tier's curvature product and its forward/adjoint choice spelled out."""
    out = dict(TIER_TEXT)
    info = (results.get("tiers") or {}).get("exact")
    if isinstance(info, Mapping):
        text = TIER_TEXT["exact"] + CURVATURE_TEXT.get(str(info.get("curvature")), "")
        direction, reason = info.get("direction"), info.get("reason")
        if direction:
            text += f" Run as a {direction} propagation, one per stage"
            text += f": {reason}." if reason else "."
        out["exact"] = text
    return out


_DECISIONS = {"APPROVED": "approved", "BLOCKED": "blocked", "PENDING": "pending"}
MINUS = "\u2212"


# ----------------------------------------------------------------------------- numbers


def _dumps(clean: Mapping) -> bytes:
    return json.dumps(clean, indent=2, sort_keys=True, allow_nan=False).encode("utf-8")


def results_json_bytes(results: Mapping) -> bytes:
    """results.json exactly as written: sorted keys, indent 2, NaN replaced by null."""
    return _dumps(sanitize(results))


def _num(x: Any) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def fmt_num(x: Any, na: str = "\u2014") -> str:
    """Three significant digits, no exponent between 0.001 and 1000, Unicode minus."""
    v = _num(x)
    if v is None:
        return na
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6 or a < 1e-3:
        s = f"{a:.2e}"
    elif a >= 1000:
        s = f"{a:,.0f}"
    else:
        s = f"{a:.3g}"
        if "e" in s:  # 100 <= a < 1000 rounds to 1e+03
            s = f"{a:.0f}"
    return (MINUS if v < 0 else "") + s


def fmt_signed(x: Any, na: str = "\u2014") -> str:
    v = _num(x)
    if v is None:
        return na
    s = fmt_num(v)
    return s if v <= 0 or s == "0" else "+" + s


def fmt_pct(x: Any, na: str = "\u2014", signed: bool = True) -> str:
    v = _num(x)
    if v is None:
        return na
    p = 100 * v
    s = f"{abs(p):.0f}%" if abs(p) >= 9.5 else f"{abs(p):.1f}%"
    if s in ("0%", "0.0%"):
        return s
    return (MINUS if p < 0 else ("+" if signed else "")) + s


def fmt_ratio(x: Any, na: str = "\u2014") -> str:
    v = _num(x)
    if v is None:
        return na
    return (MINUS if v < 0 else "") + f"{abs(v):.2f}"


def fmt_int(x: Any) -> str:
    v = _num(x)
    return "\u2014" if v is None else f"{int(v):,}"


# ----------------------------------------------------------------------------- helpers


def _req(d: Mapping, key: str, where: str) -> Any:
    if not isinstance(d, Mapping) or key not in d:
        raise AuditorError(f"missing key {key!r} (see docs/DESIGN.md, Results)", where=where)
    return d[key]


def _estimator_order(results: Mapping) -> list[str]:
    order = [str(e) for e in results.get("estimators") or []]
    extra: set[str] = set()
    for b in results.get("behaviors") or []:
        for per in (b.get("effects") or {}).values():
            extra.update(str(e) for e in (per or {}))
    return order + sorted(extra - set(order))


def primary_value(effects_for_stage: Mapping | None, primary: str) -> tuple[float | None, str | None]:
    """The primary estimator's value, else the first available of shifted, midpoint, linear."""
    per = effects_for_stage or {}
    for e in (primary, *_FALLBACK):
        v = _num(per.get(e))
        if v is not None:
            return v, e
    return None, None


def _range_text(values: Iterable[Any]) -> str:
    """'min … max' of the finite numbers among `values` (one number when they are all equal)."""
    vals = [v for v in (_num(x) for x in values) if v is not None]
    if not vals:
        return "\u2014"
    lo, hi = min(vals), max(vals)
    return fmt_num(lo) if lo == hi else f"{fmt_num(lo)} \u2026 {fmt_num(hi)}"


def png_data_uri(img: np.ndarray, min_side: int = 40, max_side: int = 64) -> str:
    """Greyscale PNG (0 black, 1 white) as a data: URI, nearest-neighbour scaled for legibility.
    Written by hand (zlib, fixed level) so that the bytes are deterministic."""
    a = np.asarray(img, dtype=float)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise AuditorError(f"expected a 2-D image, got shape {tuple(a.shape)}", where="images")
    big = max(a.shape)
    if big > max_side:
        step = math.ceil(big / max_side)
        a = a[::step, ::step]
    elif big < min_side:
        k = math.ceil(min_side / big)
        a = np.kron(a, np.ones((k, k)))
    u8 = np.round(np.clip(np.nan_to_num(a, nan=0.0), 0.0, 1.0) * 255).astype(np.uint8)
    h, w = u8.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in u8)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _check_images(images: Mapping[str, Any] | None, behaviors: list[dict]) -> dict[str, np.ndarray]:
    if not images:
        return {}
    by_name = {b["name"]: b for b in behaviors}
    out = {}
    for name, arr in images.items():
        if name not in by_name:
            raise AuditorError(f"no behaviour named {name!r}; known: {', '.join(by_name)}", where="images")
        a = np.asarray(arr)
        if a.ndim == 4 and a.shape[1] == 1:  # [N, 1, H, W]
            a = a[:, 0]
        elif a.ndim == 4 and a.shape[-1] == 1:  # [N, H, W, 1]
            a = a[..., 0]
        if a.ndim != 3:
            raise AuditorError(f"expected an array [N, H, W], got shape {tuple(np.shape(arr))}", where=f"images[{name!r}]")
        n = len((by_name[name].get("per_example") or {}).get("ids") or [])
        if a.shape[0] != n:
            raise AuditorError(f"{a.shape[0]} images for {n} per-example ids; they must be aligned",
                               where=f"images[{name!r}]")
        out[name] = a
    return out


@lru_cache(maxsize=1)
def load_compliance(path: Path = COMPLIANCE_FILE) -> tuple[dict, ...]:
    """The compliance mapping: a list of {framework, clause, title, evidence, section, verified}."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise AuditorError(f"cannot read the compliance mapping: {exc}", where=str(path)) from exc
    if not isinstance(data, list):
        raise AuditorError("expected a list of {framework, clause, title, evidence, section, verified}", where=str(path))
    out = []
    for i, row in enumerate(data):
        where = f"{path.name}[{i}]"
        for key in ("framework", "clause", "title", "evidence", "section", "verified"):
            _req(row, key, where)
        if row["section"] not in SECTION_IDS:
            raise AuditorError(f"section {row['section']!r} is not a report section; known: {', '.join(sorted(SECTION_IDS))}",
                               where=f"{where}.section")
        if not isinstance(row["verified"], bool):
            raise AuditorError("expected true or false", where=f"{where}.verified")
        out.append({k: row[k] for k in ("framework", "clause", "title", "evidence", "section", "verified")})
    return tuple(out)


# ----------------------------------------------------------------------------- view model


#: An estimate "confirms" retraining when it has the same sign and is within this fraction of |truth|.
CONFIRM_TOLERANCE = 0.25


def truth_agreement(estimate: float | None, truth: float | None) -> str | None:
    """How the retraining truth bears on an estimated stage effect: None (no truth), "confirms"
    (same sign, within CONFIRM_TOLERANCE of |truth|), "direction" (same sign only) or "disagrees"."""
    if truth is None or estimate is None:
        return None
    if (truth > 0) != (estimate > 0) or (truth == 0) != (estimate == 0):
        return "disagrees"
    return "confirms" if abs(estimate - truth) <= CONFIRM_TOLERANCE * abs(truth) else "direction"


def _diagnostics(results: Mapping, behaviors: list[dict]) -> dict[str, dict[str, Mapping]] | None:
    """{stage: {behaviour: {...}}} from results["diagnostics"] and/or each behaviour's own
    "diagnostics" {stage: {...}}; None when neither is present."""
    top = results.get("diagnostics")
    per_behavior = [b for b in behaviors if isinstance(b.get("diagnostics"), Mapping)]
    if not isinstance(top, Mapping) and not per_behavior:
        return None
    out: dict[str, dict[str, Mapping]] = {}
    for s, per in (top or {}).items():
        for bn, d in (per or {}).items():
            if isinstance(d, Mapping):
                out.setdefault(str(s), {})[str(bn)] = d
    for b in per_behavior:
        for s, d in b["diagnostics"].items():
            if isinstance(d, Mapping):
                out.setdefault(str(s), {}).setdefault(b["name"], d)
    return out


def _diag_trusted(diagnostics: Mapping | None, stage: str | None, behavior: str) -> bool | None:
    d = ((diagnostics or {}).get(stage) or {}).get(behavior)
    return None if not isinstance(d, Mapping) or d.get("trusted") is None else bool(d["trusted"])


def _judged(results: Mapping, primary: str) -> bool:
    """Whether the diagnostics' verdict applies to the headline estimator (first order in the change)."""
    exact = (results.get("tiers") or {}).get("exact")
    return judged_by_diagnostics(primary, exact.get("curvature") if isinstance(exact, Mapping) else None)


def _summary_items(results: Mapping, behaviors: list[dict], stage_names: list[str], primary: str,
                   diagnostics: Mapping | None) -> list[dict]:
    judged = _judged(results, primary)
    given = {}
    for entry in results.get("summary") or []:
        if isinstance(entry, Mapping) and entry.get("stage") in stage_names:
            given.setdefault(entry.get("behavior"), entry)
    items = []
    for b in behaviors:
        effects = b.get("effects") or {}
        entry = given.get(b["name"])
        if entry is not None:
            stage = entry["stage"]
            eff, est = primary_value(effects.get(stage), primary)
            if _num(entry.get("effect")) is not None:
                eff = _num(entry.get("effect"))
        else:
            cands = [(s, *primary_value(effects.get(s), primary)) for s in stage_names]
            cands = [c for c in cands if c[1] is not None]
            if not cands:
                items.append({"behavior": b["name"], "stage": None, "direction": None, "effect": None,
                              "estimator": None, "share": None, "truth": None, "agrees": None, "trusted": None,
                              "sentence": f"No estimate is available for {b['name']}."})
                continue
            stage, eff, est = max(cands, key=lambda c: abs(c[1]))
        share = _num((entry or {}).get("share"))
        if share is None:
            share = _share(b, stage_names, primary).get(stage)
        factual = _num(b.get("factual"))
        truth = _num((b.get("truth") or {}).get(stage))
        agreement = truth_agreement(eff, truth)
        # (the results' own summary.truth_same_stage answers another question: whether retraining names the
        # same most accountable stage; that is said below when every stage's truth is known)
        truths = {k: _num((b.get("truth") or {}).get(k)) for k in stage_names}
        truth_top = max(stage_names, key=lambda k: abs(truths[k])) if stage_names and all(
            v is not None for v in truths.values()) else None
        if eff is None:
            sentence = f"No estimate is available for the effect of {stage} on {b['name']}."
            direction = "\u2014"
        else:
            direction = "raised" if eff > 0 else ("lowered" if eff < 0 else "left unchanged")
            if eff == 0:
                sentence = f"Removing the {stage} stage would leave {b['name']} unchanged"
            elif factual is not None:
                sentence = (f"Removing the {stage} stage would {'lower' if eff > 0 else 'raise'} {b['name']} "
                            f"from {fmt_num(factual)} to {fmt_num(factual - eff)} ({fmt_signed(-eff)})")
            else:
                sentence = f"Removing the {stage} stage would change {b['name']} by {fmt_signed(-eff)}"
            flagged = _diag_trusted(diagnostics, stage, b["name"]) is False
            if flagged and judged:
                sentence += " (an estimate the diagnostics do not trust)"
            elif flagged:
                sentence += (" (the diagnostics flag this stage as far from first order: the "
                             f"{primary} estimator models that, and the fidelity section checks it)")
            if agreement is None:
                sentence += "; no retraining result is available to check it."
            else:
                verdict = {"confirms": "retraining confirms", "direction": "retraining agrees on the direction only",
                           "disagrees": "retraining does not confirm it"}[agreement]
                sentence += f"; {verdict}: {fmt_signed(-truth)}."
            if truth_top is not None and truth_top != stage:
                sentence += (f" Retraining finds the {truth_top} stage most accountable "
                             f"(effect {fmt_signed(truths[truth_top])}).")
        items.append({
            "behavior": b["name"], "stage": stage, "direction": direction, "effect": fmt_signed(eff),
            "estimator": est or "\u2014", "share": fmt_pct(share), "truth": fmt_signed(truth),
            "agrees": agreement, "sentence": sentence,
            "trusted": _diag_trusted(diagnostics, stage, b["name"]) if judged else None,
        })
    return items


def _first_stage_fidelity(behaviors: list[dict], stage_names: list[str]) -> dict | None:
    """The range of per-example Pearson correlations on the first stage, over the first-order
    estimators (naive and the AA forms) and behaviours."""
    if not stage_names:
        return None
    vals = [_num(m.get("pearson")) for b in behaviors
            for e, m in ((b.get("fidelity") or {}).get(stage_names[0]) or {}).items()
            if isinstance(m, Mapping) and e in FIRST_ORDER]
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return {"stage": stage_names[0], "low": fmt_ratio(min(vals)), "high": fmt_ratio(max(vals))}


def _extremes(results: Mapping, behaviors: list[dict]) -> list[dict]:
    """Per behaviour, the stage that raised it most and the one that lowered it most (from the
    audit's summary), with the retraining truth and whether retraining names the same stage."""
    out = []
    for entry in results.get("summary") or []:
        if not isinstance(entry, Mapping) or "raised_most" not in entry:
            continue
        b = next((x for x in behaviors if x.get("name") == entry.get("behavior")), None)
        truths = {k: _num(v) for k, v in ((b or {}).get("truth") or {}).items()}
        row = {"behavior": entry.get("behavior")}
        for key, side, sign in (("raised_most", "raised", 1), ("lowered_most", "lowered", -1)):
            x = entry.get(key)
            cands = {k: v for k, v in truths.items() if v is not None and sign * v > 0}
            truth_stage = max(cands, key=lambda k: sign * cands[k]) if cands else None
            if not x:  # no stage moved it this way by the estimate; retraining may say otherwise
                complete = truths and all(v is not None for v in truths.values())
                row[side] = None if not (complete and truth_stage) else {
                    "stage": None, "agrees": False,
                    "truth_stage": f"{truth_stage} ({fmt_signed(cands[truth_stage])})"}
                continue
            row[side] = {"stage": x.get("stage"), "effect": fmt_signed(x.get("effect")),
                         "truth": fmt_signed(x.get("truth")) if x.get("truth") is not None else None,
                         "agrees": x.get("truth_same_stage"),
                         "truth_stage": (f"{truth_stage} ({fmt_signed(cands[truth_stage])})" if truth_stage
                                         else "no stage")}
        out.append(row)
    return out


def _share(b: Mapping, stage_names: list[str], primary: str) -> dict[str, float | None]:
    given = b.get("share") or {}
    vals = {s: primary_value((b.get("effects") or {}).get(s), primary)[0] for s in stage_names}
    denom = sum(abs(v) for v in vals.values() if v is not None)
    out = {}
    for s in stage_names:
        if _num(given.get(s)) is not None:
            out[s] = _num(given.get(s))
        elif vals[s] is not None and denom > 0:
            out[s] = vals[s] / denom
        else:
            out[s] = None
    return out


def _stage_view(st: Mapping, i: int) -> dict:
    where = f"results.stages[{i}]"
    sched = st.get("schedule") or {}
    groups = []
    for g in st.get("groups") or list(sched):
        s = sched.get(g) or {}
        groups.append({
            "name": str(g),
            "lr": _range_text(s.get("lr") or []),
            "momentum": _range_text(s.get("momentum") or []),
            "weight_decay": _range_text(s.get("weight_decay") or []),
        })
    opt = str(st.get("optimizer") or "\u2014")
    if st.get("nesterov"):
        opt += " (Nesterov)"
    return {
        "name": str(_req(st, "name", where)),
        "description": st.get("description") or "",
        "owner": st.get("owner") or "\u2014",
        "optimizer": opt,
        "reset": "fresh optimizer" if st.get("reset") else "carries optimizer state",
        "steps": f"{fmt_int(st.get('first_step'))} \u2013 {fmt_int(st.get('end_step'))}",
        "n_steps": fmt_int(st.get("n_steps")),
        "groups": groups,
        "alpha": _range_text((st.get("alpha") or {}).values()),
        "beta": _range_text((st.get("beta") or {}).values()),
        "delta_norm": fmt_num(st.get("delta_norm")),
        "embedding_norm": fmt_num(st.get("embedding_norm")),
        "weight_norm": fmt_num(st.get("weight_norm")),
    }


def _scatter(b: Mapping, stage_names: list[str], estimators: list[str], primary: str, n: int) -> Markup | None:
    """Estimate-vs-truth scatter: the primary estimator and the curvature tiers present."""
    shown = [e for e in estimators if e == primary or e in TIER_TEXT]
    svg = charts.scatter_chart(b, stage_names, shown, estimators, prefix=f"scatter{n}")
    return Markup(svg) if svg else None


def _drilldown(b: Mapping, stage_names: list[str], primary: str, imgs: np.ndarray | None) -> list[dict]:
    pe = b.get("per_example") or {}
    ids = list(pe.get("ids") or [])
    n = len(ids)
    labels = list(pe.get("labels") or [])[:n]
    labels += [None] * (n - len(labels))
    factual = list(pe.get("factual") or [])[:n]
    factual += [None] * (n - len(factual))
    out = []
    for s in stage_names:
        per = (pe.get("effects") or {}).get(s) or {}
        vec, est = None, None
        for e in (primary, *_FALLBACK):
            v = per.get(e)
            if v is not None and len(v) == n:
                vec, est = v, e
                break
        if vec is None or n == 0:
            out.append({"stage": s, "estimator": None, "n": n, "up": [], "down": [], "n_up": 0, "n_down": 0})
            continue
        eff = np.array([np.nan if _num(x) is None else float(x) for x in vec])
        truth_list = (pe.get("truth") or {}).get(s)
        truth = None if truth_list is None or len(truth_list) != n else truth_list
        finite = np.isfinite(eff)
        # stable sorts: ties keep the order of the ids; NaN sorts last and fails both tests
        up = [i for i in np.argsort(-eff, kind="stable") if eff[i] > 0][:TOP_K]
        down = [i for i in np.argsort(eff, kind="stable") if eff[i] < 0][:TOP_K]

        def row(i: int) -> dict:
            return {"id": str(ids[i]), "label": "\u2014" if labels[i] is None else str(labels[i]),
                    "factual": fmt_num(factual[i]), "effect": fmt_signed(eff[i]),
                    "truth": "\u2014" if truth is None else fmt_signed(truth[i]),
                    "thumb": None if imgs is None else png_data_uri(imgs[i])}

        out.append({"stage": s, "estimator": est, "n": n, "up": [row(i) for i in up], "down": [row(i) for i in down],
                    "n_up": int(np.sum(finite & (eff > 0))), "n_down": int(np.sum(finite & (eff < 0)))})
    return out


def build_context(results: Mapping, images: Mapping[str, Any] | None = None, *,
                  json_bytes: bytes | None = None) -> dict:
    """Everything the template shows, formatted. Raises AuditorError on a malformed results dict.

    `json_bytes`: results.json as :func:`results_json_bytes` writes it, when the caller already
    has it; `results` must then be the sanitised dict it was written from.
    """
    if json_bytes is None:
        results = sanitize(results)
        json_bytes = _dumps(results)
    system = _req(results, "system", "results")
    stages_in = _req(results, "stages", "results")
    behaviors = _req(results, "behaviors", "results")
    if not isinstance(stages_in, list) or not isinstance(behaviors, list):
        raise AuditorError("stages and behaviors must be lists", where="results")
    for i, b in enumerate(behaviors):
        _req(b, "name", f"results.behaviors[{i}]")
    primary = str(results.get("primary_estimator") or "shifted")
    estimators = _estimator_order(results)
    stages = [_stage_view(st, i) for i, st in enumerate(stages_in)]
    stage_names = [s["name"] for s in stages]
    imgs = _check_images(images, behaviors)
    diagnostics = _diagnostics(results, behaviors)

    bviews = []
    n_untrusted = 0
    for b in behaviors:
        effects = b.get("effects") or {}
        truth = b.get("truth") or {}
        share = _share(b, stage_names, primary)
        factual = _num(b.get("factual"))
        rows = []
        for s in stage_names:
            per = effects.get(s) or {}
            pv, pe = primary_value(per, primary)
            tv = _num(truth.get(s))
            tr = _diag_trusted(diagnostics, s, b["name"])
            n_untrusted += tr is False
            rows.append({
                "stage": s,
                "trusted": tr,
                "factual": fmt_num(factual),
                "without": "\u2014" if pv is None or factual is None else fmt_num(factual - pv),
                "without_est": pe if pe not in (None, primary) else None,
                "effects": [{"estimator": e, "value": fmt_signed(per.get(e), na="n/a"),
                             "na": _num(per.get(e)) is None, "primary": e == primary} for e in estimators],
                "share": fmt_pct(share.get(s)),
                "truth": fmt_signed(tv),
                "without_truth": "\u2014" if tv is None or factual is None else fmt_num(factual - tv),
            })
        fid_rows = []
        fid = b.get("fidelity") or {}
        for s in stage_names:
            for e in estimators:
                m = (fid.get(s) or {}).get(e)
                if not isinstance(m, Mapping):
                    continue
                p = _num(m.get("pearson"))
                sa = _num(m.get("sign_agreement"))
                fid_rows.append({
                    "stage": s, "estimator": e, "primary": e == primary,
                    "pearson": fmt_ratio(p), "spearman": fmt_ratio(m.get("spearman")),
                    # below the 70 % threshold must not read as 70 % (0.698 -> "69.8%")
                    "sign_agreement": (f"{math.floor(1000 * sa) / 10:.1f}%" if sa is not None and 0.695 <= sa < 0.7
                                       else fmt_pct(sa, signed=False)),
                    "abs_error": fmt_num(m.get("abs_error")), "rel_error": fmt_pct(m.get("rel_error"), signed=False),
                    "weak_p": p is not None and p < 0.5, "weak_s": sa is not None and sa < 0.7,
                })
        has_na = any(r["na"] for row in rows for r in row["effects"])
        bviews.append({
            "name": b["name"], "anchor": f"b{len(bviews) + 1}",
            "description": b.get("description") or "", "kind": b.get("kind") or "\u2014",
            "aggregate": b.get("aggregate") or "\u2014", "n_examples": fmt_int(b.get("n_examples")),
            "differentiable": b.get("differentiable"), "klass": b.get("class"),
            "factual": fmt_num(factual), "rows": rows, "fidelity": fid_rows, "has_na": has_na,
            "chart": Markup(charts.behavior_chart(
                b, stage_names, estimators, primary,
                [primary_value(effects.get(s), primary)[0] for s in stage_names],
                prefix=f"bchart{len(bviews) + 1}")),
            "scatter": _scatter(b, stage_names, estimators, primary, len(bviews) + 1),
            "drilldown": _drilldown(b, stage_names, primary, imgs.get(b["name"])),
            "has_images": b["name"] in imgs,
        })

    heat = charts.heatmap_chart(behaviors, stage_names,
                                lambda b, s: primary_value((b.get("effects") or {}).get(s), primary), fmt_signed)
    timeline = charts.timeline_chart(stages_in)

    diag_rows = []
    for s in stage_names + sorted(set(diagnostics or {}) - set(stage_names)):
        per = (diagnostics or {}).get(s) or {}
        for bn in [b["name"] for b in behaviors if b["name"] in per] + sorted(set(per) - {b["name"] for b in behaviors}):
            d = per[bn]
            diag_rows.append({
                "stage": s, "behavior": bn, "gap": fmt_ratio(d.get("linear_shifted_gap")),
                "displacement": fmt_ratio(d.get("relative_displacement")),
                "later_motion": fmt_ratio(d.get("later_motion")),
                "trusted": None if d.get("trusted") is None else bool(d["trusted"]), "exact": bool(d.get("exact")),
                "reason": str(d.get("reason") or ""),
            })

    gates = []
    for g in results.get("gates") or []:
        status = str(g.get("status") or "").upper()
        gates.append({
            "id": g.get("id") or "\u2014", "rule": g.get("rule") or "\u2014",
            "description": g.get("description") or "", "behavior": g.get("behavior") or "\u2014",
            "stage": g.get("stage") or "\u2014", "estimator": g.get("estimator") or "\u2014",
            "observed": fmt_num(g.get("observed")), "min": fmt_num(g.get("min")), "max": fmt_num(g.get("max")),
            "status": status or "\u2014", "status_class": {"PASS": "pass", "FAIL": "fail"}.get(status, "unknown"),
            "detail": g.get("detail") or "",
        })
    n_fail = sum(g["status"] == "FAIL" for g in gates)

    decision = results.get("decision")
    decision_text = str(decision) if decision else "NOT RECORDED"
    versions = results.get("versions") or {}
    fidelity_summary = _flatten(results.get("fidelity_summary")) if results.get("fidelity_summary") else []

    return {
        "sections": SECTIONS,
        "system": {"name": str(system.get("name") or "\u2014"), "version": str(system.get("version") or "\u2014"),
                   "owner": str(system.get("owner") or "\u2014")},
        "pipeline": {"path": str((results.get("pipeline") or {}).get("path") or "\u2014"),
                     "sha256": str((results.get("pipeline") or {}).get("sha256") or "\u2014")},
        "generated_at": str(results.get("generated_at") or "\u2014"),
        "report_id": str(results.get("report_id") or "\u2014"),
        "decision": decision_text,
        "decision_class": _DECISIONS.get(decision_text, "unknown"),
        "device": str(results.get("device") or "\u2014"),
        "dtype": str(results.get("dtype") or "\u2014"),
        "estimators": estimators,
        "primary": primary,
        "judged": _judged(results, primary),  # the diagnostics' verdict applies to the headline estimator
        "stages": stages,
        "behaviors": bviews,
        "summary": _summary_items(results, behaviors, stage_names, primary, diagnostics),
        "first_stage_fidelity": _first_stage_fidelity(behaviors, stage_names),
        "extremes": _extremes(results, behaviors),
        "truth_source": str(results.get("truth_source") or ""),
        "tiers": [e for e in estimators if e in TIER_TEXT],
        "tier_text": _tier_texts(results),
        "timeline_chart": Markup(timeline) if timeline else None,
        "heatmap_chart": Markup(heat) if heat else None,
        "diagnostics": diag_rows if diagnostics is not None else None,
        "n_untrusted": n_untrusted,
        "gates": gates,
        "n_gates_fail": n_fail,
        "reviewers": [{"name": str(r.get("name") or ""), "role": str(r.get("role") or "")}
                      for r in results.get("reviewers") or [] if isinstance(r, Mapping)],
        "inputs": [{"role": str(x.get("role") or "\u2014"), "path": str(x.get("path") or "\u2014"),
                    "sha256": str(x.get("sha256") or "\u2014"), "bytes": fmt_int(x.get("bytes"))}
                   for x in results.get("inputs") or [] if isinstance(x, Mapping)],
        "versions": [(str(k), str(v)) for k, v in versions.items()] if isinstance(versions, Mapping) else [],
        "seeds": [(str(k), str(v)) for k, v in (results.get("seeds") or {}).items()],
        "fidelity_summary": fidelity_summary,
        "results_sha256": hashlib.sha256(json_bytes).hexdigest(),
        "compliance": load_compliance(),
        "section_titles": dict(SECTIONS),
        "top_k": TOP_K,
        "confirm_tolerance": CONFIRM_TOLERANCE,
    }


def _flatten(obj: Any, path: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """A nested mapping as (key path, formatted value) rows, for blocks of unknown shape."""
    if isinstance(obj, Mapping):
        return [row for k, v in obj.items() for row in _flatten(v, (*path, str(k)))]
    key = " \u203a ".join(path)
    if obj is None or isinstance(obj, (bool, str)):
        return [(key, "\u2014" if obj is None else str(obj))]
    if isinstance(obj, (int, float)):
        return [(key, fmt_num(obj))]
    return [(key, ", ".join(fmt_num(x) if isinstance(x, (int, float)) else str(x) for x in obj))]


@lru_cache(maxsize=1)
def _env() -> Environment:
    return Environment(loader=FileSystemLoader(str(TEMPLATES_DIR)), autoescape=True, undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def _css() -> Markup:
    css = (TEMPLATES_DIR / "report.css").read_text(encoding="utf-8")
    if "</" in css:
        raise AuditorError("the stylesheet may not contain '</'", where=str(TEMPLATES_DIR / "report.css"))
    return Markup(css)


def render_html(results: dict, images: dict[str, np.ndarray] | None = None, *,
                json_bytes: bytes | None = None) -> str:
    """The self-contained HTML report (inline CSS and SVG, no external URL).
    `json_bytes`: as for :func:`build_context`."""
    ctx = build_context(results, images, json_bytes=json_bytes)
    return _env().get_template("report.html.j2").render(css=_css(), **ctx)
