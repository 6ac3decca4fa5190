"""Release gates: evaluate the pipeline's `policy:` section against the audit results.

A gate compares one number from the results dict (see docs/DESIGN.md, "Results") with a
closed interval [min, max] (either bound may be omitted):

* ``stage_effect``: the estimated effect of stage ``stage`` on behaviour ``behavior``;
* ``any_stage_effect``: the effect of every stage on ``behavior`` (the gate reports the
  stage that breaks the bound by the most, or, when none does, the one closest to it);
* ``final_value``: the factual aggregate f(θ_T) of ``behavior`` (no estimator involved).

``estimator`` (optional) selects the estimate; the default is ``results["primary_estimator"]``.
It is checked on every rule but has no effect on ``final_value`` (reported as null there).
``stage`` is only allowed on ``stage_effect``. A value that is not a finite number fails.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

from auditor.errors import AuditorError, GateFailure

RULES = ("stage_effect", "any_stage_effect", "final_value")
_ALLOWED_KEYS = {
    "stage_effect": {"id", "rule", "stage", "behavior", "estimator", "min", "max", "description"},
    "any_stage_effect": {"id", "rule", "behavior", "estimator", "min", "max", "description"},
    "final_value": {"id", "rule", "behavior", "estimator", "min", "max", "description"},
}


def _fmt(x: float | None) -> str:
    if x is None:
        return "undefined"
    return f"{x:.6g}"


def _is_number(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _finite_or_none(x: Any) -> float | None:
    if x is None or not _is_number(x) or not math.isfinite(float(x)):
        return None
    return float(x)


def _check(observed: float | None, lo: float | None, hi: float | None) -> bool:
    if observed is None:
        return False
    if lo is not None and observed < lo:
        return False
    if hi is not None and observed > hi:
        return False
    return True


def _bounds_text(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"the range [{_fmt(lo)}, {_fmt(hi)}]"
    if hi is not None:
        return f"the maximum {_fmt(hi)}"
    return f"the minimum {_fmt(lo)}"


def _verdict(observed: float | None, lo: float | None, hi: float | None) -> str:
    if observed is None:
        return f"is not a finite number, so it cannot satisfy {_bounds_text(lo, hi)}"
    if hi is not None and observed > hi:
        return f"is {_fmt(observed)}, above the maximum {_fmt(hi)}"
    if lo is not None and observed < lo:
        return f"is {_fmt(observed)}, below the minimum {_fmt(lo)}"
    return f"is {_fmt(observed)}, within {_bounds_text(lo, hi)}"


def _margin(observed: float, lo: float | None, hi: float | None) -> float:
    """Distance to the nearest bound: negative when a bound is broken."""
    m = math.inf
    if hi is not None:
        m = min(m, hi - observed)
    if lo is not None:
        m = min(m, observed - lo)
    return m


def _validate(i: int, gate: Any, results: dict, seen_ids: set[str]) -> dict:
    where = f"policy[{i}]"
    if not isinstance(gate, dict):
        raise AuditorError(f"expected a mapping with id, rule, behavior and min/max, got {type(gate).__name__}", where=where)
    rule = gate.get("rule")
    if rule not in RULES:
        raise AuditorError(f"unknown rule {rule!r}; expected one of {', '.join(RULES)}", where=f"{where}.rule")
    for key in gate:
        if key not in _ALLOWED_KEYS[rule]:
            raise AuditorError(
                f"unexpected key for rule {rule!r}; allowed: {', '.join(sorted(_ALLOWED_KEYS[rule]))}",
                where=f"{where}.{key}",
            )
    gid = gate.get("id")
    if not isinstance(gid, str) or not gid.strip():
        raise AuditorError("missing or empty gate id (a short string such as 'final-loss')", where=f"{where}.id")
    if gid in seen_ids:
        raise AuditorError(f"duplicate gate id {gid!r}", where=f"{where}.id")
    seen_ids.add(gid)

    behaviors = {b["name"]: b for b in results.get("behaviors", [])}
    bname = gate.get("behavior")
    if bname not in behaviors:
        raise AuditorError(
            f"unknown behaviour {bname!r}; known: {', '.join(behaviors) or '(none)'}", where=f"{where}.behavior"
        )
    stage = gate.get("stage")
    if rule == "stage_effect":
        stages = [s["name"] for s in results.get("stages", [])]
        if stage not in stages:
            raise AuditorError(f"unknown stage {stage!r}; known: {', '.join(stages) or '(none)'}", where=f"{where}.stage")

    estimator = gate.get("estimator", results.get("primary_estimator"))
    if rule != "final_value" or "estimator" in gate:
        known = results.get("estimators", [])
        if estimator not in known:
            raise AuditorError(
                f"unknown estimator {estimator!r}; known: {', '.join(known) or '(none)'}",
                where=f"{where}.estimator" if "estimator" in gate else "results.primary_estimator",
            )
    if rule == "final_value":
        estimator = None

    lo, hi = gate.get("min"), gate.get("max")
    if lo is None and hi is None:
        raise AuditorError("give min, max or both", where=f"{where}.min")
    for key, val in (("min", lo), ("max", hi)):
        if val is not None and (not _is_number(val) or not math.isfinite(float(val))):
            raise AuditorError(f"expected a finite number, got {val!r}", where=f"{where}.{key}")
    lo = None if lo is None else float(lo)
    hi = None if hi is None else float(hi)
    if lo is not None and hi is not None and lo > hi:
        raise AuditorError(f"min {_fmt(lo)} is greater than max {_fmt(hi)}", where=f"{where}.min")
    desc = gate.get("description")
    if desc is not None and not isinstance(desc, str):
        raise AuditorError("expected a string", where=f"{where}.description")
    return {"id": gid, "rule": rule, "behavior": behaviors[bname], "stage": stage,
            "estimator": estimator, "min": lo, "max": hi, "description": desc}


def _effect(behavior: dict, stage: str, estimator: str, where: str) -> float | None:
    per_stage = behavior.get("effects", {}).get(stage)
    if per_stage is None or estimator not in per_stage:
        raise AuditorError(
            f"results hold no {estimator!r} effect of stage {stage!r} on behaviour {behavior['name']!r}", where=where
        )
    value = per_stage[estimator]
    if value is None:
        raise AuditorError(
            f"the {estimator!r} estimator gives no value for behaviour {behavior['name']!r} "
            f"(kind {behavior.get('kind')!r}); choose another estimator",
            where=where,
        )
    return _finite_or_none(value)


def evaluate_gates(policy: list[dict] | None, results: dict) -> list[dict]:
    """Evaluate every gate of ``policy`` against ``results`` (the AuditResult dict).

    Returns one dict per gate, in policy order: ``{id, rule, description, behavior, stage,
    estimator, observed, min, max, status, detail}``; ``status`` is "PASS" or "FAIL".
    Raises AuditorError naming ``policy[i].field`` for a malformed gate.
    """
    if policy is None:
        return []
    if not isinstance(policy, list):
        raise AuditorError(f"expected a list of gates, got {type(policy).__name__}", where="policy")
    out: list[dict] = []
    seen: set[str] = set()
    for i, raw in enumerate(policy):
        g = _validate(i, raw, results, seen)
        b, lo, hi, est = g["behavior"], g["min"], g["max"], g["estimator"]
        bname = b["name"]
        where = f"policy[{i}].estimator" if "estimator" in raw else f"policy[{i}]"
        stage = g["stage"]
        if g["rule"] == "stage_effect":
            observed = _effect(b, stage, est, where)
            subject = f"The {est} estimate of the effect of stage '{stage}' on '{bname}'"
            default_desc = f"Effect of stage '{stage}' on '{bname}' within {_bounds_text(lo, hi)}"
        elif g["rule"] == "any_stage_effect":
            effects = [(s["name"], _effect(b, s["name"], est, where)) for s in results.get("stages", [])]
            if not effects:
                raise AuditorError("results hold no stages", where=f"policy[{i}]")
            # the stage with a non-finite effect first, then the smallest margin to a bound
            stage, observed = min(
                effects, key=lambda se: -math.inf if se[1] is None else _margin(se[1], lo, hi)
            )
            status_word = "breaks" if not _check(observed, lo, hi) else "comes closest to"
            subject = (f"Of all stages, '{stage}' {status_word} the bound: the {est} estimate "
                       f"of its effect on '{bname}'")
            default_desc = f"No stage's effect on '{bname}' outside {_bounds_text(lo, hi)}"
        else:
            observed = _finite_or_none(b.get("factual"))
            subject = f"The final value of '{bname}' (aggregate f(θ_T))"
            default_desc = f"Final value of '{bname}' within {_bounds_text(lo, hi)}"
        ok = _check(observed, lo, hi)
        out.append({
            "id": g["id"],
            "rule": g["rule"],
            "description": g["description"] or default_desc,
            "behavior": bname,
            "stage": stage,
            "estimator": est,
            "observed": observed,
            "min": lo,
            "max": hi,
            "status": "PASS" if ok else "FAIL",
            "detail": f"{subject} {_verdict(observed, lo, hi)}.",
        })
    return out


def decision(gates: list[dict]) -> str:
    """"BLOCKED" if any gate failed, "APPROVED" if all passed, "PENDING" if there are none."""
    if not gates:
        return "PENDING"
    return "BLOCKED" if any(g["status"] != "PASS" for g in gates) else "APPROVED"


def raise_for_gates(gates: list[dict]) -> None:
    """Raise GateFailure (exit 3) naming the failed gates, if any failed."""
    failed = [g for g in gates if g["status"] != "PASS"]
    if failed:
        raise GateFailure(
            f"{len(failed)} release gate(s) failed: "
            + "; ".join(f"{g['id']}: {g['detail']}" for g in failed)
        )
