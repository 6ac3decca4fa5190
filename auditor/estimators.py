"""Stage embeddings and the estimates of τ_k(f) (ESTIMATORS.md §3.1).

Shapes: parameters are ``dict[str, Tensor]``; a behaviour ``f(params) -> Tensor[N]``.
These per-behaviour functions are the reference; ``auditor.audit`` computes the same forms with
the model outputs shared between behaviours that read the same data (tests hold the two equal).

    e_k       = α_k Δ_k + β_k δm_{b_k}          (per parameter)
    linear    τ̂_k = ∇f(θ_T) · e_k               one JVP along e_k
    midpoint  τ̄_k = ∇f(θ_T − e_k/2) · e_k       one JVP along e_k
    shifted   τ̃_k = f(θ_T) − f(θ_T − e_k)       one forward pass
    naive     f(θ_T) − f(θ_T − Δ_k)             the checkpoint-difference ("task vector") baseline
"""

from __future__ import annotations

from typing import Callable

import torch

Params = dict[str, torch.Tensor]
Behaviour = Callable[[Params], torch.Tensor]

ESTIMATORS = ("naive", "linear", "midpoint", "shifted")


def embedding(delta: Params, dmom: Params, coeffs: dict[str, tuple[float, float]]) -> Params:
    """e = α Δ + β δm, per parameter (α, β from :func:`auditor.propagation.propagation_coefficients`)."""
    return {p: coeffs[p][0] * delta[p] + coeffs[p][1] * dmom[p] for p in delta}


def axpy(theta: Params, e: Params, c: float) -> Params:
    """θ + c·e."""
    return {p: theta[p] + c * e[p] for p in theta}


def shifted(f: Behaviour, theta: Params, e: Params, f_theta: torch.Tensor | None = None) -> torch.Tensor:
    """f(θ) − f(θ − e): [N]."""
    with torch.no_grad():
        base = f(theta) if f_theta is None else f_theta
        return base - f(axpy(theta, e, -1.0))


def directional(f: Behaviour, at: Params, e: Params) -> torch.Tensor:
    """∇f(at) · e for every example at once (forward mode): [N]."""
    _, tangent = torch.func.jvp(f, (at,), (e,))
    return tangent.detach()


def linear(f: Behaviour, theta: Params, e: Params) -> torch.Tensor:
    return directional(f, theta, e)


def midpoint(f: Behaviour, theta: Params, e: Params) -> torch.Tensor:
    return directional(f, axpy(theta, e, -0.5), e)
