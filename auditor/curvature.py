"""Curvature-aware propagation of a stage's difference through the later steps (ESTIMATORS.md §3.2).

Notation (ESTIMATORS.md §1-3). Removing stage k leaves a boundary difference
(factual − counterfactual) δθ_{b_k} = Δ_k, δm_{b_k}; it is carried through every later
step t by the later step's own dynamics. This module keeps the Hessian H_t of the
step-t minibatch loss (the AA estimator of §3.1 sets it to 0):

    SGD (PyTorch semantics, dampening 0), per parameter group (η, μ, λ):
        δg_t     = (H_t + λ_t) δθ_t
        μ_t ≠ 0: δm_{t+1} = μ_t δm_t + δg_t
                 δθ_{t+1} = δθ_t − η_t δm_{t+1}                (Nesterov: δθ_t − η_t (δg_t + μ_t δm_{t+1}))
        μ_t = 0: δm_{t+1} = δm_t  (buffer untouched),  δθ_{t+1} = δθ_t − η_t δg_t
    A later stage that resets its optimizer sets δm := 0 at its start.

    AdamW, "secant" step (not linearised; exact on quadratic losses):
        g_cf = g − H_t δθ_t
        factual moments (m, v, k) and counterfactual moments (m', v', k') both take the exact
        Adam update with g resp. g_cf;  u = m̂ / (√v̂ + ε), m̂ = m / (1 − β1^k), v̂ = v / (1 − β2^k)
        δθ_{t+1} = (1 − η λ) δθ_t − η (u − u')

Three tiers live here:

* :func:`propagate_exact` — forward, one curvature product per later step (the accuracy tier).
  Two curvature products (``curvature=``), both exact on quadratic losses:
  ``"hessian"``: H(θ_c) δθ, the Hessian at the checkpoint θ_c (an HVP, ESTIMATORS.md §3.2 as
  written); ``"secant"``: the Hessian averaged along the segment from θ_c − δθ to θ_c, applied to
  δθ, i.e. (∫₀¹ H(θ_c − s δθ) ds) δθ = ∇L(θ_c) − ∇L(θ_c − δθ), computed exactly by two
  gradients. The secant product keeps the loss's nonlinearity along δθ, which decides the
  estimate when δθ is large (an early stage followed by much training).
* :func:`adjoint_sweep` / :func:`adjoint_exact` — the transpose (SGD stages only): one backward
  sweep per behaviour gives the covectors at every stage boundary.
* :func:`spectral_segments` / :func:`propagate_spectral` — the cheap tier: H held constant on a
  segment (a later stage's span between recorded checkpoints), top-r algebraically largest
  eigenpairs by Lanczos (:func:`lanczos_top`), the rest by plain AA; (about) 3r + 20 HVPs per
  segment whatever its length.

Conventions. Parameters are ``dict[str, Tensor]``; the differences δθ, δm have the keys of
``delta_theta`` (the trainable parameters; give zeros for those a stage left unchanged).
Parameters that a stage's ``param_group`` does not list are frozen during that stage
(η = μ = 0: δθ, δm pass through unchanged). HVPs are evaluated at ``checkpoint_at(t)``, the
nearest recorded checkpoint at or before step t, on step t's own minibatch; for SGD on a
quadratic loss this is exact whichever checkpoint is used (H does not depend on θ).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .steplog import StageSchedule

__all__ = [
    "CURVATURES",
    "HVPCounter",
    "hessian_vector_product",
    "propagate_exact",
    "adjoint_sweep",
    "adjoint_exact",
    "lanczos_top",
    "segment_bounds",
    "SpectralSegment",
    "spectral_segments",
    "propagate_spectral",
]

Params = dict[str, Tensor]
CURVATURES = ("secant", "hessian")
BatchLoss = Callable[[Params, str, list[int]], Tensor]
CheckpointAt = Callable[[int], Params]
OptimStateAt = Callable[[str], "dict | None"]
Progress = Callable[[int, int], None]


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET = _Unset()


@dataclass
class HVPCounter:
    """Counts the work done. ``hvp``: Hessian-vector products (for the spectral tier one product
    with the segment's batch-averaged Hessian counts once); ``batch_hvp``: double-backward passes
    through one minibatch (hvp × batches averaged); ``grad``: extra gradient evaluations."""

    hvp: int = 0
    batch_hvp: int = 0
    grad: int = 0


# --------------------------------------------------------------------------------------------
# small helpers


def _zeros_like(d: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in d.items()}


def _check_stage(st: StageSchedule, keys: Sequence[str]) -> list[int]:
    """Column (group index) of each key in ``st``'s hyperparameter arrays; −1 = frozen in ``st``."""
    if st.optimizer not in ("sgd", "adamw"):
        raise ValueError(f"stage {st.stage!r}: optimizer {st.optimizer!r}; expected 'sgd' or 'adamw'")
    if not st.param_group:
        raise ValueError(f"stage {st.stage!r}: param_group is empty; expected a map parameter name -> group")
    if st.batches is None or len(st.batches) != st.n_steps:
        got = "none" if st.batches is None else len(st.batches)
        raise ValueError(f"stage {st.stage!r}: {got} recorded batches for {st.n_steps} steps; the curvature "
                         "tiers need the minibatch of every step (the log's 'batch' column)")
    if st.optimizer == "adamw" and (st.beta1 is None or st.beta2 is None or st.eps is None):
        raise ValueError(f"stage {st.stage!r}: AdamW stage without beta1/beta2/eps arrays")
    cols = []
    for k in keys:
        g = st.param_group.get(k)
        if g is None:
            cols.append(-1)
        elif g not in st.groups:
            raise ValueError(f"stage {st.stage!r}: parameter {k!r} maps to group {g!r}, not one of {st.groups}")
        else:
            cols.append(st.groups.index(g))
    return cols


def _ext(arr: np.ndarray, fill: float) -> np.ndarray:
    """[n_steps, n_groups] -> [n_steps, n_groups + 1]; column −1 (frozen) holds ``fill``."""
    return np.concatenate([np.asarray(arr, dtype=np.float64), np.full((arr.shape[0], 1), fill)], axis=1)


def _leaves(params: Params, keys: Sequence[str]) -> Params:
    missing = [k for k in keys if k not in params]
    if missing:
        raise KeyError(f"checkpoint lacks parameter(s) {missing[:3]}; expected every key of delta_theta")
    return {k: (v.detach().requires_grad_(True) if k in keys else v.detach()) for k, v in params.items()}


def hessian_vector_product(batch_loss: BatchLoss, params: Params, stage_name: str, batch_ids: Sequence[int],
                           vector: Params, *, with_grad: bool = False,
                           counter: HVPCounter | None = None) -> tuple[Params, Params | None]:
    """H v and (optionally) g for one minibatch, by double backward.

    L = batch_loss(params, stage_name, batch_ids) (scalar); g = ∇L(params); Hv = ∇(g · v).
    Only the keys of ``vector`` are differentiated (others held fixed). Shapes: every output
    tensor has the shape and dtype of ``vector[key]``. Parameters that do not reach the loss, or
    reach it linearly, get zeros.
    """
    keys = list(vector)
    p = _leaves(params, keys)
    leaves = [p[k] for k in keys]
    with torch.enable_grad():
        loss = batch_loss(p, stage_name, list(batch_ids))
        gs = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        dot = None
        for k, g in zip(keys, gs):
            if g is not None and g.requires_grad:
                term = (g * vector[k].to(g)).sum()
                dot = term if dot is None else dot + term
        hs = torch.autograd.grad(dot, leaves, allow_unused=True) if dot is not None else [None] * len(keys)
    if counter is not None:
        counter.hvp += 1
        counter.batch_hvp += 1
    hv = {k: (torch.zeros_like(vector[k]) if h is None else h.detach().to(vector[k]))
          for k, h in zip(keys, hs)}
    grad = None
    if with_grad:
        grad = {k: (torch.zeros_like(vector[k]) if g is None else g.detach().to(vector[k]))
                for k, g in zip(keys, gs)}
    return hv, grad


def gradient_difference(batch_loss: BatchLoss, params: Params, stage_name: str, batch_ids: Sequence[int],
                        vector: Params, *, with_grad: bool = False,
                        counter: HVPCounter | None = None) -> tuple[Params, Params | None]:
    """The secant replacement of H v: δg = ∇L(θ) − ∇L(θ − v), and (optionally) g = ∇L(θ).

    Equal to H v for a quadratic L; otherwise it keeps every higher-order term along v, which is
    what matters when the boundary difference is large (an early stage followed by much
    training). Cost: two gradients, about one HVP. Shapes as :func:`hessian_vector_product`.
    """
    keys = list(vector)

    def grad_at(p: Params) -> Params:
        leaves = _leaves(p, keys)
        with torch.enable_grad():
            loss = batch_loss(leaves, stage_name, list(batch_ids))
            gs = torch.autograd.grad(loss, [leaves[k] for k in keys], allow_unused=True)
        return {k: (torch.zeros_like(vector[k]) if g is None else g.detach().to(vector[k])) for k, g in zip(keys, gs)}

    g1 = grad_at(params)
    g0 = grad_at({k: (v - vector[k].to(v) if k in vector else v) for k, v in params.items()})
    if counter is not None:
        counter.grad += 2
    return {k: g1[k] - g0[k] for k in keys}, (g1 if with_grad else None)


def _sgd_linear_step(th: Tensor, m: Tensor, hv: Tensor, eta: float, mu: float, lam: float,
                     nesterov: bool) -> tuple[Tensor, Tensor]:
    """One linearised SGD step for one parameter tensor (scalar hyperparameters).

    δg = Hδθ + λδθ;  μ≠0: δm' = μδm + δg, δθ' = δθ − η(δm' | δg + μδm' if Nesterov);
    μ=0: δm' = δm, δθ' = δθ − ηδg.
    """
    dg = hv + lam * th
    if mu != 0.0:
        m_new = mu * m + dg
        upd = dg + mu * m_new if nesterov else m_new
    else:
        m_new = m
        upd = dg
    return th - eta * upd, m_new


def _sgd_vec_step(a: np.ndarray, b: np.ndarray, hv: np.ndarray, eta: np.ndarray, mu: np.ndarray,
                  lam: np.ndarray, nesterov: bool) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_sgd_linear_step` with per-coordinate hyperparameters (numpy, broadcasting)."""
    dg = hv + lam * a
    mom = mu != 0.0
    b_new = np.where(mom, mu * b + dg, b)
    upd = np.where(mom, dg + mu * b_new if nesterov else b_new, dg)
    return a - eta * upd, b_new


def _adam_vec_step(x: np.ndarray, y: np.ndarray, hv: np.ndarray, eta: np.ndarray, lam: np.ndarray,
                   b1: np.ndarray, etak: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frozen-preconditioner AdamW step in whitened coordinates x = P^-½ δθ, y = P^½ δm:
    y' = β1 y + (1 − β1) (P^½HP^½) x;  x' = (1 − ηλ) x − η/(1 − β1^k) y'."""
    y_new = b1 * y + (1.0 - b1) * hv
    return (1.0 - eta * lam) * x - etak * y_new, y_new


# --------------------------------------------------------------------------------------------
# Adam state


def _state_step(state: dict, key: str) -> int:
    s = state.get("step", 0)
    if isinstance(s, dict):
        s = s.get(key, 0)
    if isinstance(s, Tensor):
        s = s.item()
    return int(float(s))


def _adam_state(state: dict | None, like: Params) -> tuple[Params, Params, dict[str, int]]:
    """(exp_avg, exp_avg_sq, step) per parameter from an optimizer-state dict.

    Accepts ``{"exp_avg": {name: T}, "exp_avg_sq": {name: T}, "step": int}`` or the file form
    ``{"exp_avg.<name>": T, "exp_avg_sq.<name>": T, "step": int}``; ``step`` may be an int, a
    string, a 0-d tensor or a per-parameter dict. Missing entries are zeros; ``None`` is fresh.
    """
    m, v, k = _zeros_like(like), _zeros_like(like), {n: 0 for n in like}
    if state is None:
        return m, v, k
    for name in like:
        for src, dst, prefix in ((state.get("exp_avg"), m, "exp_avg."), (state.get("exp_avg_sq"), v, "exp_avg_sq.")):
            t = src.get(name) if isinstance(src, dict) else state.get(prefix + name)
            if t is not None:
                dst[name] = t.detach().to(like[name]).clone()
        k[name] = _state_step(state, name)
    return m, v, k


# --------------------------------------------------------------------------------------------
# exact tier: forward


def propagate_exact(delta_theta: Params, delta_m: Params | None, later: Sequence[StageSchedule],
                    batch_loss: BatchLoss, checkpoint_at: CheckpointAt, *,
                    optimizer_state_at_stage_start: OptimStateAt | None = None,
                    cf_optimizer_state: "dict | None | _Unset" = _UNSET,
                    progress: Progress | None = None, counter: HVPCounter | None = None,
                    return_state: bool = False, curvature: str = "hessian"):
    """Propagate the boundary difference through every later step (exact tier).

    ``curvature``: "hessian" = H(θ_c) δθ by an HVP (:func:`hessian_vector_product`); "secant" =
    the segment-averaged Hessian times δθ, ∇L(θ_c) − ∇L(θ_c − δθ) (:func:`gradient_difference`):
    identical on quadratics, and it keeps the nonlinearity of the loss along δθ.

    Inputs: ``delta_theta`` = Δ_k = θ_{b_k} − θ_{a_k} (dict of tensors, any shapes);
    ``delta_m`` = δm_{b_k} (SGD momentum-buffer difference, used when ``later[0]`` is an SGD
    stage that carries; None = 0); ``later`` = the stages after k in time order.
    Output: e = δθ_T, a dict with the keys/shapes of ``delta_theta`` (with ``return_state``:
    ``(δθ_T, δm_T)``, δm_T the momentum / exp_avg difference).

    Per later SGD step: one HVP at ``checkpoint_at(t)`` on the step's batch, then the
    linear map of the module docstring (per-group η, μ, λ; μ = 0 leaves δm; Nesterov).
    Exact for quadratic losses whatever checkpoints are used.

    Per later AdamW step: the secant step. It needs the factual gradient g_t = ∇L_t(θ_t) and
    the factual moments; g_t is taken at ``checkpoint_at(t)`` (**approximation**: exact only
    when the checkpoint is θ_t itself — pass a ``checkpoint_at`` that returns the factual
    trajectory, e.g. checkpoints at every step, to make the step exact on quadratics). The
    factual moments start from ``optimizer_state_at_stage_start(stage)`` (None = fresh) and are
    advanced with these gradients; the counterfactual moments start fresh at a reset and, for a
    carrying ``later[0]``, from ``cf_optimizer_state`` = the optimizer state the counterfactual
    run enters with (the state at a_k: None when stage k itself started fresh; must be passed
    explicitly in that case). At a later AdamW stage that carries, the factual moments are
    re-synchronised to the recorded state and the counterfactual ones keep their difference.
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature {curvature!r}; expected one of {CURVATURES}")
    step_fn = gradient_difference if curvature == "secant" else hessian_vector_product
    keys = list(delta_theta)
    dth = {k: v.detach().clone() for k, v in delta_theta.items()}
    dm = {k: (delta_m[k].detach().to(dth[k]).clone() if delta_m is not None and k in delta_m
              else torch.zeros_like(dth[k])) for k in keys}
    total = sum(st.n_steps for st in later)
    done = 0
    prev_kind = None
    adam_f = adam_c = None      # (m, v, step) factual / counterfactual
    for j, st in enumerate(later):
        cols = _check_stage(st, keys)
        if st.optimizer == "sgd":
            if st.reset:
                dm = _zeros_like(dth)
            elif j > 0 and prev_kind != "sgd":
                raise ValueError(f"stage {st.stage!r} carries the optimizer state of an AdamW stage")
            lr, mom, wd = _ext(st.lr, 0.0), _ext(st.momentum, 0.0), _ext(st.weight_decay, 0.0)
            for i in range(st.n_steps):
                t = st.first_step + i
                hv, _ = step_fn(batch_loss, checkpoint_at(t), st.stage, st.batches[i], dth, counter=counter)
                for k, c in zip(keys, cols):
                    dth[k], dm[k] = _sgd_linear_step(dth[k], dm[k], hv[k], float(lr[i, c]), float(mom[i, c]),
                                                     float(wd[i, c]), st.nesterov)
                done += 1
                if progress is not None:
                    progress(done, total)
        else:
            adam_f, adam_c = _adam_entry(st, j, prev_kind, dth, adam_f, adam_c, optimizer_state_at_stage_start,
                                         cf_optimizer_state)
            mf, vf, kf = adam_f
            mc, vc, kc = adam_c
            lr, wd = _ext(st.lr, 0.0), _ext(st.weight_decay, 0.0)
            b1, b2, eps = _ext(st.beta1, 0.0), _ext(st.beta2, 0.0), _ext(st.eps, 1.0)
            for i in range(st.n_steps):
                t = st.first_step + i
                hv, g = step_fn(batch_loss, checkpoint_at(t), st.stage, st.batches[i], dth, with_grad=True,
                                counter=counter)
                for k, c in zip(keys, cols):
                    if c < 0:
                        continue
                    be1, be2, ep = float(b1[i, c]), float(b2[i, c]), float(eps[i, c])
                    eta, lam = float(lr[i, c]), float(wd[i, c])
                    gf = g[k]
                    gc = gf - hv[k]
                    mf[k] = be1 * mf[k] + (1 - be1) * gf
                    vf[k] = be2 * vf[k] + (1 - be2) * gf * gf
                    mc[k] = be1 * mc[k] + (1 - be1) * gc
                    vc[k] = be2 * vc[k] + (1 - be2) * gc * gc
                    kf[k] += 1
                    kc[k] += 1
                    uf = _adam_direction(mf[k], vf[k], kf[k], be1, be2, ep)
                    uc = _adam_direction(mc[k], vc[k], kc[k], be1, be2, ep)
                    dth[k] = (1 - eta * lam) * dth[k] - eta * (uf - uc)
                done += 1
                if progress is not None:
                    progress(done, total)
            dm = {k: mf[k] - mc[k] for k in keys}
        prev_kind = st.optimizer
    return (dth, dm) if return_state else dth


def _adam_direction(m: Tensor, v: Tensor, k: int, b1: float, b2: float, eps: float) -> Tensor:
    """u = (m / (1 − β1^k)) / (√(v / (1 − β2^k)) + ε)  (PyTorch's AdamW, amsgrad off)."""
    return (m / (1 - b1 ** k)) / ((v / (1 - b2 ** k)).sqrt() + eps)


def _adam_entry(st, j, prev_kind, like, adam_f, adam_c, state_at, cf_state):
    """Factual and counterfactual Adam moments entering AdamW stage ``st`` (index j in ``later``)."""
    if st.reset:
        return _adam_state(None, like), _adam_state(None, like)
    recorded = state_at(st.stage) if state_at is not None else None
    if j == 0:
        if state_at is None:
            raise ValueError(f"stage {st.stage!r} is an AdamW stage that carries: pass "
                             "optimizer_state_at_stage_start")
        if isinstance(cf_state, _Unset):
            raise ValueError(f"stage {st.stage!r} is an AdamW stage that carries: pass cf_optimizer_state "
                             "(the optimizer state at the removed stage's start; None = fresh)")
        return _adam_state(recorded, like), _adam_state(cf_state, like)
    if prev_kind != "adamw":
        raise ValueError(f"stage {st.stage!r} (AdamW) carries the optimizer state of an SGD stage")
    if recorded is None:
        return adam_f, adam_c
    mf0, vf0, kf0 = adam_f
    mc0, vc0, kc0 = adam_c
    mf, vf, kf = _adam_state(recorded, like)
    mc = {k: mf[k] - (mf0[k] - mc0[k]) for k in mf}
    vc = {k: (vf[k] - (vf0[k] - vc0[k])).clamp_min(0.0) for k in vf}
    kc = {k: max(kf[k] - (kf0[k] - kc0[k]), 0) for k in kf}
    return (mf, vf, kf), (mc, vc, kc)


# --------------------------------------------------------------------------------------------
# exact tier: adjoint


def adjoint_sweep(grad_f: Params, later: Sequence[StageSchedule], batch_loss: BatchLoss,
                  checkpoint_at: CheckpointAt, *, progress: Progress | None = None,
                  counter: HVPCounter | None = None) -> list[tuple[Params, Params]]:
    """One backward sweep v_t = J_{T←t}ᵀ ∇f(θ_T) through the SGD steps of ``later``.

    Returns a list of ``len(later) + 1`` pairs (v_θ, v_m); entry j is the covector at the
    start of ``later[j]`` *before* its reset (entry ``len(later)`` is (∇f, 0) at T), so that for
    the stage removed just before ``later[j]``:

        τ ≈ v_θ · Δ + v_m · δm_{b}      ( = ∇f · propagate_exact(Δ, δm, later[j:]) )

    (v_m = 0 when ``later[j]`` resets). Transposed step, with D = H_t + Λ_t symmetric and
    a_θ', a_m' the covectors after step t:

        μ≠0:       w = a_m' − η a_θ',          a_m = μ w
        Nesterov:  w = a_m' − (1+μ) η a_θ',     a_m = μ (a_m' − μ η a_θ')
        μ=0:       w = −η a_θ',                 a_m = a_m'
        a_θ = a_θ' + D w                         (one HVP on w at checkpoint_at(t))

    AdamW stages are not supported (the secant step is not linear; use :func:`propagate_exact`,
    one forward propagation per stage) and raise ValueError.
    """
    keys = list(grad_f)
    ath = {k: v.detach().clone() for k, v in grad_f.items()}
    am = _zeros_like(ath)
    out: list[tuple[Params, Params]] = [None] * (len(later) + 1)  # type: ignore[list-item]
    out[len(later)] = ({k: v.clone() for k, v in ath.items()}, _zeros_like(ath))
    total = sum(st.n_steps for st in later)
    done = 0
    for j in range(len(later) - 1, -1, -1):
        st = later[j]
        cols = _check_stage(st, keys)
        if st.optimizer != "sgd":
            raise ValueError(f"stage {st.stage!r}: the adjoint sweep covers SGD stages only; use propagate_exact "
                             "for AdamW stages (secant step)")
        if j > 0 and not st.reset and later[j - 1].optimizer != "sgd":
            raise ValueError(f"stage {st.stage!r} carries the optimizer state of an AdamW stage")
        lr, mom, wd = _ext(st.lr, 0.0), _ext(st.momentum, 0.0), _ext(st.weight_decay, 0.0)
        for i in range(st.n_steps - 1, -1, -1):
            t = st.first_step + i
            w = {}
            for k, c in zip(keys, cols):
                eta, mu = float(lr[i, c]), float(mom[i, c])
                if mu != 0.0:
                    if st.nesterov:
                        w[k] = am[k] - (1 + mu) * eta * ath[k]
                        am[k] = mu * (am[k] - mu * eta * ath[k])
                    else:
                        w[k] = am[k] - eta * ath[k]
                        am[k] = mu * w[k]
                else:
                    w[k] = -eta * ath[k]
            hw, _ = hessian_vector_product(batch_loss, checkpoint_at(t), st.stage, st.batches[i], w, counter=counter)
            for k, c in zip(keys, cols):
                ath[k] = ath[k] + hw[k] + float(wd[i, c]) * w[k]
            done += 1
            if progress is not None:
                progress(done, total)
        if st.reset:
            am = _zeros_like(ath)
        out[j] = ({k: v.clone() for k, v in ath.items()}, {k: v.clone() for k, v in am.items()})
    return out


def adjoint_exact(grad_f: Params, later: Sequence[StageSchedule], batch_loss: BatchLoss,
                  checkpoint_at: CheckpointAt, **kwargs) -> tuple[Params, Params]:
    """(v_θ, v_m) at the boundary b_k before ``later[0]``: τ ≈ v_θ·Δ_k + v_m·δm_{b_k}.
    Entry 0 of :func:`adjoint_sweep` (which gives every boundary in the same sweep)."""
    return adjoint_sweep(grad_f, later, batch_loss, checkpoint_at, **kwargs)[0]


# --------------------------------------------------------------------------------------------
# Lanczos


def lanczos_top(matvec: Callable[[Tensor], Tensor], n: int, k: int, n_iter: int | None = None, *,
                dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
                seed: int = 0, tol: float = 1e-10) -> tuple[Tensor, Tensor, int]:
    """Top-k **algebraically largest** eigenpairs of a symmetric operator, by Lanczos with full
    reorthogonalisation.

    matvec: v [n] -> A v [n]. Runs m = min(n, n_iter or 3k + 20) iterations (m matvecs):
    Q [n, m] orthonormal Krylov basis, T = Qᵀ A Q tridiagonal (α on the diagonal, β beside it),
    T = S diag(θ) Sᵀ; the Ritz pairs (θ_i, Q S_i) of the k largest θ are returned. On breakdown
    (β ≈ 0: an invariant subspace is exhausted, e.g. repeated eigenvalues) the iteration restarts
    from a random vector orthogonal to Q (β = 0 in T), so m = n gives the full spectrum.
    Returns (eigenvalues [k] descending, eigenvectors [n, k], number of matvecs).
    """
    m = min(n, n_iter if n_iter is not None else 3 * k + 20)
    k = min(k, m)
    if k <= 0 or n == 0:
        return torch.zeros(0, dtype=dtype, device=device), torch.zeros(n, 0, dtype=dtype, device=device), 0
    gen = torch.Generator().manual_seed(seed)

    def rand_orth(Qj: Tensor) -> Tensor:
        for _ in range(3):
            q = torch.randn(n, generator=gen, dtype=dtype).to(device)
            for _ in range(2):
                q = q - Qj @ (Qj.T @ q)
            nq = q.norm()
            if nq > 1e-8:
                return q / nq
        raise RuntimeError("Lanczos: could not find a vector orthogonal to the Krylov basis")

    Q = torch.zeros(n, m, dtype=dtype, device=device)
    alphas = torch.zeros(m, dtype=dtype)
    betas = torch.zeros(max(m - 1, 0), dtype=dtype)
    q = rand_orth(Q[:, :0])
    scale = 0.0
    n_mv = 0
    for j in range(m):
        Q[:, j] = q
        w = matvec(q).to(dtype)
        n_mv += 1
        a = torch.dot(q, w)
        alphas[j] = a
        Qj = Q[:, : j + 1]
        for _ in range(2):
            w = w - Qj @ (Qj.T @ w)
        scale = max(scale, abs(float(a)), float(w.norm()))
        if j == m - 1:
            break
        b = w.norm()
        if float(b) <= tol * max(scale, 1e-300):
            betas[j] = 0.0
            q = rand_orth(Qj)
        else:
            betas[j] = b
            q = w / b
    T = torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)
    theta, S = torch.linalg.eigh(T)
    idx = torch.argsort(theta, descending=True)[:k]
    return theta[idx].to(device), Q @ S[:, idx].to(device=device, dtype=dtype), n_mv


# --------------------------------------------------------------------------------------------
# spectral tier


def segment_bounds(stages: Sequence[StageSchedule], checkpoint_steps: Sequence[int] | None = None
                   ) -> list[tuple[int, int, int]]:
    """Segments (stage index, start step, end step): each stage's span [first_step, end_step)
    cut at the recorded checkpoint steps strictly inside it (None: one segment per stage)."""
    cps = sorted(set(int(c) for c in (checkpoint_steps or [])))
    out = []
    for j, st in enumerate(stages):
        cuts = [st.first_step] + [c for c in cps if st.first_step < c < st.end_step] + [st.end_step]
        out.extend((j, a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a)
    return out


@dataclass
class SpectralSegment:
    """Constant-curvature model of one segment [start, end) of a later stage.

    H̄ = mean Hessian over ``batch_steps``' minibatches at ``checkpoint_at(start)``; for AdamW the
    whitened H̃ = P^½ H̄ P^½ with P = 1/(√v̂ + ε) frozen at the segment start. Kept: the top-r
    algebraically largest eigenpairs (``eigenvalues`` [r], ``eigenvectors`` [n, r], over the
    flattened parameters in ``keys`` order). ``sqrt_precond`` [n]: P^½ (AdamW) or None.
    ``n_hvp``: products with H̄ (Lanczos iterations, ≤ 3r + 20); ``n_batch_hvp`` = n_hvp × batches.
    """

    stage: str
    stage_index: int
    start: int
    end: int
    optimizer: str
    keys: list[str]
    eigenvalues: Tensor
    eigenvectors: Tensor
    sqrt_precond: Tensor | None
    batch_steps: list[int]
    adam_step0: int = 0
    n_hvp: int = 0
    n_batch_hvp: int = 0
    n_grad: int = 0
    _reduced: dict | None = field(default=None, repr=False)


class _Layout:
    """Flattening of a parameter dict: keys in order, vector [n] = cat(p.reshape(-1))."""

    def __init__(self, like: Params):
        self.keys = list(like)
        self.shapes = [like[k].shape for k in self.keys]
        self.sizes = [like[k].numel() for k in self.keys]
        first = next(iter(like.values()))
        self.dtype, self.device = first.dtype, first.device
        self.n = sum(self.sizes)

    def flat(self, d: Params | None) -> Tensor:
        if d is None:
            return torch.zeros(self.n, dtype=self.dtype, device=self.device)
        return torch.cat([(d[k].detach().reshape(-1).to(self.dtype) if k in d else
                           torch.zeros(s, dtype=self.dtype, device=self.device))
                          for k, s in zip(self.keys, self.sizes)])

    def unflat(self, v: Tensor) -> Params:
        return {k: c.reshape(s).clone() for k, c, s in zip(self.keys, torch.split(v, self.sizes), self.shapes)}

    def coord_cols(self, cols: Sequence[int]) -> Tensor:
        return torch.cat([torch.full((s,), c, dtype=torch.long) for s, c in zip(self.sizes, cols)])


class _AveragedHessian:
    """v [n] -> H̄ v [n], H̄ = mean_b ∇² L_b at fixed params; the gradient graph is built once."""

    def __init__(self, batch_loss, params, stage_name, batches, layout: _Layout, counter, need_sq_grads):
        self.layout = layout
        p = _leaves(params, layout.keys)
        self.leaves = [p[k] for k in layout.keys]
        self.nb = len(batches)
        self.counter = counter
        g_sum = None
        self.g2 = torch.zeros(layout.n, dtype=layout.dtype, device=layout.device) if need_sq_grads else None
        with torch.enable_grad():
            for ids in batches:
                loss = batch_loss(p, stage_name, list(ids))
                gs = torch.autograd.grad(loss, self.leaves, create_graph=True, allow_unused=True)
                flat = torch.cat([(g.reshape(-1) if g is not None else
                                   torch.zeros(leaf.numel(), dtype=leaf.dtype, device=leaf.device))
                                  for g, leaf in zip(gs, self.leaves)])
                g_sum = flat if g_sum is None else g_sum + flat
                if need_sq_grads:
                    d = flat.detach().to(layout.dtype)
                    self.g2 += d * d / self.nb
        self.g = g_sum / self.nb
        self.n_mv = 0

    def __call__(self, v: Tensor) -> Tensor:
        self.n_mv += 1
        if self.counter is not None:
            self.counter.hvp += 1
            self.counter.batch_hvp += self.nb
        if not self.g.requires_grad:
            return torch.zeros_like(v)
        with torch.enable_grad():
            dot = (self.g * v.to(self.g)).sum()
            hs = torch.autograd.grad(dot, self.leaves, retain_graph=True, allow_unused=True)
        return torch.cat([(h.reshape(-1) if h is not None else torch.zeros(leaf.numel(), dtype=leaf.dtype,
                                                                           device=leaf.device))
                          for h, leaf in zip(hs, self.leaves)]).detach().to(v)


def _adam_step0(stages, j, state_at) -> int:
    """Adam step count at the start of stages[j] (0 after a reset)."""
    st = stages[j]
    if st.reset:
        return 0
    rec = state_at(st.stage) if state_at is not None else None
    if rec is not None:
        return max(_state_step(rec, k) for k in st.param_group)
    if j > 0 and stages[j - 1].optimizer == "adamw":
        return _adam_step0(stages, j - 1, state_at) + stages[j - 1].n_steps
    return 0


def spectral_segments(stages: Sequence[StageSchedule], batch_loss: BatchLoss, checkpoint_at: CheckpointAt,
                      params_like: Params, checkpoint_steps: Sequence[int] | None = None, *,
                      rank: int = 20, n_batches: int = 4, lanczos_iters: int | None = None,
                      optimizer_state_at_stage_start: OptimStateAt | None = None,
                      adam_preconditioner: Callable[[int], Params] | None = None, seed: int = 0,
                      counter: HVPCounter | None = None, progress: Progress | None = None
                      ) -> list[SpectralSegment]:
    """Build the constant-curvature model of every segment of ``stages`` (shared by all earlier
    stages: build once for the whole run, pass to :func:`propagate_spectral` as ``segments``).

    For each segment [s, e) (:func:`segment_bounds`): params = checkpoint_at(s); H̄ = mean of the
    minibatch Hessians of ``n_batches`` steps evenly spread over the segment; Lanczos
    (:func:`lanczos_top`, ``lanczos_iters`` default 3·rank + 20) on H̄ (SGD) or on
    P^½ H̄ P^½ (AdamW). Cost per segment: ≤ 3·rank + 20 products with H̄, independent of e − s.

    AdamW normaliser P = 1/(√v̂ + ε) at s: ``adam_preconditioner(s)`` (dict of P) when given;
    otherwise from the stage-start state (v0, k0; fresh = 0) and G2 = mean_b g_b² over the chosen
    batches at the checkpoint (assumes g² stationary over the n = s − first_step steps so far):
    v̂ = (β2ⁿ v0 + (1 − β2ⁿ) G2) / (1 − β2^(k0+n)), or G2 when k0 + n = 0.
    ``params_like``: names/shapes/dtype of the trainable parameters (e.g. delta_theta).
    """
    layout = _Layout(params_like)
    bounds = segment_bounds(stages, checkpoint_steps)
    out = []
    for si, (j, s, e) in enumerate(bounds):
        st = stages[j]
        cols = _check_stage(st, layout.keys)
        steps = sorted(set(int(round(x)) for x in np.linspace(s, e - 1, max(1, min(n_batches, e - s)))))
        batches = [st.batches[t - st.first_step] for t in steps]
        params = checkpoint_at(s)
        is_adam = st.optimizer == "adamw"
        k0 = _adam_step0(stages, j, optimizer_state_at_stage_start) if is_adam else 0
        need_g2 = is_adam and adam_preconditioner is None
        op = _AveragedHessian(batch_loss, params, st.stage, batches, layout, counter, need_g2)
        sq = None
        if is_adam:
            if adam_preconditioner is not None:
                sq = layout.flat(adam_preconditioner(s)).clamp_min(0).sqrt()
            else:
                i0 = s - st.first_step
                ccols = layout.coord_cols(cols)
                b2 = torch.as_tensor(_ext(st.beta2, 0.0)[i0], dtype=layout.dtype)[ccols].to(layout.device)
                eps = torch.as_tensor(_ext(st.eps, 1.0)[i0], dtype=layout.dtype)[ccols].to(layout.device)
                rec = optimizer_state_at_stage_start(st.stage) if (optimizer_state_at_stage_start is not None
                                                                   and not st.reset) else None
                v0 = layout.flat(_adam_state(rec, layout.unflat(layout.flat(None)))[1]) if rec is not None \
                    else layout.flat(None)
                kk = k0 + i0
                if kk == 0:
                    vhat = op.g2
                else:
                    decay = b2 ** i0
                    vhat = (decay * v0 + (1 - decay) * op.g2) / (1 - b2 ** kk)
                sq = (1.0 / (vhat.clamp_min(0).sqrt() + eps)).sqrt()
                if counter is not None:
                    counter.grad += len(batches)

            def matvec(v, op=op, sq=sq):
                return sq * op(sq * v)
        else:
            matvec = op
        evals, evecs, n_mv = lanczos_top(matvec, layout.n, rank, lanczos_iters, dtype=layout.dtype,
                                         device=layout.device, seed=seed + si)
        out.append(SpectralSegment(stage=st.stage, stage_index=j, start=s, end=e, optimizer=st.optimizer,
                                   keys=layout.keys, eigenvalues=evals, eigenvectors=evecs, sqrt_precond=sq,
                                   batch_steps=steps, adam_step0=k0, n_hvp=n_mv, n_batch_hvp=n_mv * len(batches),
                                   n_grad=len(batches) if need_g2 else 0))
        if progress is not None:
            progress(si + 1, len(bounds))
    return out


def _reduced_model(seg: SpectralSegment, coord_cols: Tensor, tol: float = 1e-9) -> dict:
    """Group-split basis of the kept eigen-space and the reduced Hessian.

    U [n, r] (eigenvectors), h [r]. Per group g (coordinates where the stage's hyperparameters are
    the same scalars; −1 = frozen), Q_g = orthonormal basis of U restricted to g. S = ⊕_g span(Q_g)
    contains span(U) and is invariant under every group-diagonal map, so with Q = blockdiag(Q_g)
    [n, R]: H_r Q c = Q K c, K = B diag(h) Bᵀ [R, R], B = Qᵀ U [R, r]; and the orthogonal
    remainder (I − QQᵀ)δ sees H_r = 0 (plain AA). R ≤ r · (number of groups).
    """
    U, h = seg.eigenvectors, seg.eigenvalues
    blocks, groups = [], []
    for g in sorted(set(coord_cols.tolist())):
        idx = (coord_cols == g).nonzero().squeeze(1).to(U.device)
        groups.append(g)
        if U.shape[1] == 0:
            continue
        Qg, S, _ = torch.linalg.svd(U[idx], full_matrices=False)
        Qg = Qg[:, S > tol]
        if Qg.shape[1]:
            blocks.append((g, idx, Qg))
    if blocks:
        B = torch.cat([Qg.T @ U[idx] for _, idx, Qg in blocks], 0)
        K = (B * h.to(B)) @ B.T
        red_cols = np.concatenate([np.full(Qg.shape[1], g) for g, _, Qg in blocks])
    else:
        K = torch.zeros(0, 0, dtype=U.dtype)
        red_cols = np.zeros(0, dtype=np.int64)
    return {"blocks": blocks, "K": K.cpu().numpy(), "red_cols": red_cols.astype(np.int64),
            "groups": np.asarray(groups, dtype=np.int64), "coord_cols": coord_cols}


def _segment_schedule(st: StageSchedule, seg: SpectralSegment, cols_idx: np.ndarray):
    """Per-step hyperparameters of the segment for each entry of cols_idx (−1 = frozen): arrays
    [L, len(cols_idx)]. SGD: (η, μ, λ); AdamW: (η, λ, β1, η/(1 − β1^k)) with k the factual step count."""
    a, b = seg.start - st.first_step, seg.end - st.first_step
    if st.optimizer == "sgd":
        return (_ext(st.lr, 0.0)[a:b][:, cols_idx], _ext(st.momentum, 0.0)[a:b][:, cols_idx],
                _ext(st.weight_decay, 0.0)[a:b][:, cols_idx])
    eta = _ext(st.lr, 0.0)[a:b][:, cols_idx]
    lam = _ext(st.weight_decay, 0.0)[a:b][:, cols_idx]
    b1 = _ext(st.beta1, 1.0)[a:b][:, cols_idx]
    k = (seg.adam_step0 + np.arange(a, b) + 1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        etak = np.where(eta != 0.0, eta / (1.0 - b1 ** k), 0.0)
    return eta, lam, b1, etak


def _propagate_segment(seg: SpectralSegment, st: StageSchedule, th: Tensor, m: Tensor, layout: _Layout,
                       cols: list[int]) -> tuple[Tensor, Tensor]:
    """Carry (δθ, δm) [n] through the segment: kept eigen-space by the reduced recurrence (per step,
    O(R²) scalar work), remainder by the per-group 2×2 AA products; AdamW in whitened coordinates."""
    coord_cols = layout.coord_cols(cols)
    if seg._reduced is None or not torch.equal(seg._reduced["coord_cols"], coord_cols):
        seg._reduced = _reduced_model(seg, coord_cols)
    red = seg._reduced
    is_adam = st.optimizer == "adamw"
    if is_adam:
        x, y = th / seg.sqrt_precond, m * seg.sqrt_precond
    else:
        x, y = th, m
    # project
    ca = [Qg.T @ x[idx] for _, idx, Qg in red["blocks"]]
    cb = [Qg.T @ y[idx] for _, idx, Qg in red["blocks"]]
    rx, ry = x.clone(), y.clone()
    for (_, idx, Qg), a_, b_ in zip(red["blocks"], ca, cb):
        rx[idx] -= Qg @ a_
        ry[idx] -= Qg @ b_
    a = torch.cat(ca).cpu().numpy() if ca else np.zeros(0)
    b = torch.cat(cb).cpu().numpy() if cb else np.zeros(0)
    K = red["K"]
    # reduced recurrence
    sched = _segment_schedule(st, seg, red["red_cols"])
    for i in range(seg.end - seg.start):
        hv = K @ a
        if is_adam:
            eta, lam, b1, etak = (s_[i] for s_ in sched)
            a, b = _adam_vec_step(a, b, hv, eta, lam, b1, etak)
        else:
            eta, mu, lam = (s_[i] for s_ in sched)
            a, b = _sgd_vec_step(a, b, hv, eta, mu, lam, st.nesterov)
    # remainder: per-group 2x2 products (H = 0), both columns at once
    groups = red["groups"]
    gs = _segment_schedule(st, seg, groups)
    P = np.broadcast_to(np.array([1.0, 0.0]), (len(groups), 2)).copy()   # θ row of the product
    Mr = np.broadcast_to(np.array([0.0, 1.0]), (len(groups), 2)).copy()  # m row
    zero = np.zeros_like(P)
    for i in range(seg.end - seg.start):
        if is_adam:
            eta, lam, b1, etak = (s_[i][:, None] for s_ in gs)
            P, Mr = _adam_vec_step(P, Mr, zero, eta, lam, b1, etak)
        else:
            eta, mu, lam = (s_[i][:, None] for s_ in gs)
            P, Mr = _sgd_vec_step(P, Mr, zero, eta, mu, lam, st.nesterov)
    gpos = {int(g): n for n, g in enumerate(groups)}
    pos = torch.as_tensor([gpos[int(c)] for c in coord_cols.tolist()], dtype=torch.long)
    Pt, Mt = torch.as_tensor(P, dtype=x.dtype)[pos].to(x.device), torch.as_tensor(Mr, dtype=x.dtype)[pos].to(x.device)
    nx = Pt[:, 0] * rx + Pt[:, 1] * ry
    ny = Mt[:, 0] * rx + Mt[:, 1] * ry
    # recompose
    off = 0
    at, bt = torch.as_tensor(a, dtype=x.dtype).to(x.device), torch.as_tensor(b, dtype=x.dtype).to(x.device)
    for _, idx, Qg in red["blocks"]:
        r = Qg.shape[1]
        nx[idx] += Qg @ at[off:off + r]
        ny[idx] += Qg @ bt[off:off + r]
        off += r
    if is_adam:
        return nx * seg.sqrt_precond, ny / seg.sqrt_precond
    return nx, ny


def propagate_spectral(delta_theta: Params, delta_m: Params | None, later: Sequence[StageSchedule],
                       batch_loss: BatchLoss | None = None, checkpoint_at: CheckpointAt | None = None,
                       checkpoint_steps: Sequence[int] | None = None, *,
                       segments: Sequence[SpectralSegment] | None = None, rank: int = 20, n_batches: int = 4,
                       lanczos_iters: int | None = None, optimizer_state_at_stage_start: OptimStateAt | None = None,
                       adam_preconditioner: Callable[[int], Params] | None = None, seed: int = 0,
                       counter: HVPCounter | None = None, progress: Progress | None = None,
                       return_state: bool = False):
    """Spectral tier: e = δθ_T with H constant and rank-r on each segment of the later stages.

    ``segments``: prebuilt by :func:`spectral_segments` (over the whole run; those of ``later``
    are picked by stage name); otherwise built here from ``batch_loss``, ``checkpoint_at``,
    ``checkpoint_steps`` (cost in ``counter``). Per segment, with U h Uᵀ the kept eigenpairs:

        SGD:   the kept eigen-space evolves by the linear step with H = U h Uᵀ — for a direction
               u_i inside one parameter group exactly the 2×2 recurrence of §3.1 with λ_t → λ_t + h_i;
               across groups with different hyperparameters the group-split basis of
               :func:`_reduced_model` keeps it exact for H = U h Uᵀ. The remainder: plain AA.
        AdamW: whitened x = P^-½ δθ, y = P^½ δm (δm = exp_avg difference), frozen P:
               y' = β1 y + (1 − β1) H̃ x, x' = (1 − ηλ) x − η/(1 − β1^k) y', H̃ = P^½ H̄ P^½ of rank r;
               the remainder takes the same step with H̃ = 0, which is AA's [[1 − ηλ, 0], [0, 0]]
               whenever its y is 0 (always at rank 0; a y left by a previous segment of the same
               stage decays with β1 instead of being dropped). As in AA, a carried Adam difference
               entering the first later stage is neglected (δm := 0 there when it is AdamW).

    Resets set δm := 0. Shapes: dicts like ``delta_theta``; returns δθ_T (``return_state``:
    (δθ_T, δm_T)). Rank 0 reproduces AA exactly.
    """
    layout = _Layout(delta_theta)
    if segments is None:
        if batch_loss is None or checkpoint_at is None:
            raise ValueError("propagate_spectral: pass segments, or batch_loss and checkpoint_at")
        segments = spectral_segments(later, batch_loss, checkpoint_at, delta_theta, checkpoint_steps, rank=rank,
                                     n_batches=n_batches, lanczos_iters=lanczos_iters,
                                     optimizer_state_at_stage_start=optimizer_state_at_stage_start,
                                     adam_preconditioner=adam_preconditioner, seed=seed, counter=counter)
    th = layout.flat(delta_theta)
    m = layout.flat(delta_m)
    prev_kind = None
    total = len(later)
    for j, st in enumerate(later):
        cols = _check_stage(st, layout.keys)
        mine = sorted((s for s in segments if s.stage == st.stage and st.first_step <= s.start < st.end_step),
                      key=lambda s: s.start)
        covered = st.first_step
        for s in mine:
            if s.start != covered:
                break
            covered = s.end
        if covered != st.end_step:
            raise ValueError(f"stage {st.stage!r}: the segments given do not cover steps {st.first_step}.."
                             f"{st.end_step - 1} contiguously")
        if st.reset or (j == 0 and st.optimizer == "adamw"):
            m = torch.zeros_like(m)
        elif j > 0 and prev_kind != st.optimizer:
            raise ValueError(f"stage {st.stage!r} carries the optimizer state of a stage of another kind")
        for seg in mine:
            if seg.keys != layout.keys:
                raise ValueError("spectral segment built for other parameters than delta_theta")
            th, m = _propagate_segment(seg, st, th, m, layout, cols)
        prev_kind = st.optimizer
        if progress is not None:
            progress(j + 1, total)
    e = layout.unflat(th)
    return (e, layout.unflat(m)) if return_state else e
