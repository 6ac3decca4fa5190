"""AA propagation (ESTIMATORS.md §3.1): the 2×2 recurrence with curvature ignored.

Every coordinate of a parameter group evolves through a later step t by

    [δθ; δm]_{t+1} = A_t [δθ; δm]_t

    SGD:       A_t = [[1 − η λ, −η μ], [λ, μ]]            (μ = 0: [[1 − η λ, 0], [0, 1]])
    Nesterov:  A_t = [[1 − η λ (1 + μ), −η μ²], [λ, μ]]
    AdamW:     A_t = [[1 − η λ, 0], [0, 0]]

and a later stage that resets its optimizer applies R = [[1, 0], [0, 0]] at its start.
(α_k, β_k) is the first row of the product over all steps after stage k, per parameter.
"""

from __future__ import annotations

import numpy as np

from .steplog import StageSchedule

R = np.array([[1.0, 0.0], [0.0, 0.0]])


def step_matrices(s: StageSchedule) -> np.ndarray:
    """A_t for every step and group of a stage: float64 [n_steps, n_groups, 2, 2]."""
    lr, mu, wd = s.lr, s.momentum, s.weight_decay
    A = np.zeros((*lr.shape, 2, 2))
    if s.optimizer == "adamw":
        A[..., 0, 0] = 1.0 - lr * wd
        return A
    nest = s.nesterov
    A[..., 0, 0] = 1.0 - lr * wd * ((1.0 + mu) if nest else 1.0)
    A[..., 0, 1] = -lr * (mu**2 if nest else mu)
    A[..., 1, 0] = wd
    A[..., 1, 1] = mu
    # μ = 0: PyTorch leaves the buffer untouched and steps with the plain gradient.
    still = mu == 0.0
    A[..., 0, 0] = np.where(still, 1.0 - lr * wd, A[..., 0, 0])
    A[..., 0, 1] = np.where(still, 0.0, A[..., 0, 1])
    A[..., 1, 0] = np.where(still, 0.0, A[..., 1, 0])
    A[..., 1, 1] = np.where(still, 1.0, A[..., 1, 1])
    return A


def stage_product(s: StageSchedule) -> np.ndarray:
    """M_g = A_{last} ⋯ A_{first} for each group (the reset at the stage's start excluded): [n_groups, 2, 2]."""
    A = step_matrices(s)
    M = np.broadcast_to(np.eye(2), (len(s.groups), 2, 2)).copy()
    for t in range(A.shape[0]):
        M = A[t] @ M
    return M


def stage_product_reference(s: StageSchedule, group: str) -> np.ndarray:
    """Slow reference for one group: the product written out step by step with explicit matrices."""
    j = s.group_index(group)
    M = np.eye(2)
    for t in range(s.n_steps):
        eta, mu, lam = s.lr[t, j], s.momentum[t, j], s.weight_decay[t, j]
        if s.optimizer == "adamw":
            A = np.array([[1 - eta * lam, 0.0], [0.0, 0.0]])
        elif mu == 0:
            A = np.array([[1 - eta * lam, 0.0], [0.0, 1.0]])
        elif s.nesterov:
            A = np.array([[1 - eta * lam * (1 + mu), -eta * mu * mu], [lam, mu]])
        else:
            A = np.array([[1 - eta * lam, -eta * mu], [lam, mu]])
        M = A @ M
    return M


def propagation_coefficients(schedules: list[StageSchedule], k: int, params: list[str],
                             skipped: frozenset[int] = frozenset()) -> dict[str, tuple[float, float]]:
    """(α, β) per parameter for the boundary difference of stage k (§3.1; §3.3 when ``skipped``
    names further removed stages, whose own steps are then left out of the product).
    """
    products = {j: stage_product(schedules[j]) for j in range(k + 1, len(schedules)) if j not in skipped}
    out = {}
    for p in params:
        P = np.eye(2)
        for j in range(k + 1, len(schedules)):
            if j in skipped:
                continue
            s = schedules[j]
            if s.reset:
                P = R @ P
            P = products[j][s.group_index(s.param_group[p])] @ P
        out[p] = (float(P[0, 0]), float(P[0, 1]))
    return out
