"""Agreement between an estimate and the retraining truth.

Per-example vectors est, truth: [N]; aggregate values: scalars.
"""

from __future__ import annotations

import math

import numpy as np


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson r; None when either side is constant (r undefined)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else None


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return sums[inv] / counts[inv]


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    return pearson(_ranks(np.asarray(a, float)), _ranks(np.asarray(b, float)))


def sign_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of examples where sign(est) = sign(truth) (zeros count as their own sign)."""
    return float(np.mean(np.sign(a) == np.sign(b)))


def compare(est: np.ndarray, truth: np.ndarray, est_agg: float, truth_agg: float) -> dict:
    abs_err = abs(est_agg - truth_agg)
    return {
        "pearson": pearson(est, truth),
        "spearman": spearman(est, truth),
        "sign_agreement": sign_agreement(est, truth),
        "abs_error": abs_err,
        "rel_error": abs_err / abs(truth_agg) if truth_agg != 0 else None,
    }


#: Estimates that are first order in the stage's change: naive and the AA forms.
FIRST_ORDER = ("naive", "linear", "midpoint", "shifted")


def judged_by_diagnostics(primary: str, curvature: str | None) -> bool:
    """Whether the linearization diagnostics speak for the headline estimator: naive, the AA forms,
    the spectral tier and the exact tier with Hessian products are first order in the stage's
    change; the exact tier with the secant product is not (its check is retraining)."""
    return primary in (*FIRST_ORDER, "spectral") or (primary == "exact" and curvature == "hessian")
