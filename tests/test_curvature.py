"""Curvature-aware propagation (auditor/curvature.py) against brute-force retraining.

Closed-form models (ESTIMATORS.md §4.2: on quadratic losses the curvature tiers are exact).

* Linear model with MSE: f(x) = W x + b, step loss L_B(W, b) = (1/2|B|) Σ_{i∈B} ‖W x_i + b − y_i‖².
  With θ = (vec W, b) and z_i = (x_i, 1): L_B(θ) = ½ (θ − c_B)ᵀ A_B (θ − c_B) + const, where
  A_B = (1/|B|) Σ_i z_i z_iᵀ ⊗ I (a fixed matrix per step, the batches being fixed per step). So the
  gradient is affine, ∇L_B(θ) − ∇L_B(θ') = A_B (θ − θ'), whatever θ' is; every SGD step
  (m' = μm + ∇L + λθ, θ' = θ − ηm', PyTorch semantics) is affine in (θ, m), and the difference of
  two runs (factual − counterfactual) obeys δm' = μδm + (A_B + λ)δθ, δθ' = δθ − ηδm' *exactly* —
  with A_B the Hessian at any point, so HVPs at any checkpoint give it. For AdamW the update is
  not affine, but the counterfactual gradient is exactly g − A_B δθ, so applying the Adam update
  to both moment sets (the secant step) reproduces retraining exactly when the factual gradient g
  is taken at θ_t itself (checkpoints at every step).
* Generic quadratic: L_B(θ) = (1/|B|) Σ_{i∈B} ½ (θ − c_i)ᵀ A_i (θ − c_i), θ = concat of the parameter
  tensors; Hessian (1/|B|) Σ A_i. With A_i = A for all i, H is the same at every step, so a spectral
  model at full rank (all eigenpairs of A) is the exact dynamics.

The ground truth is retraining written here with torch.optim.SGD / torch.optim.AdamW: the factual
run, and the run without stage k (its steps skipped; a stage that resets still creates its fresh
optimizer, so a carrying successor enters with the state at a_k), later steps replayed with the
same batches and per-step, per-group hyperparameters. Truth: e = θ_T − θ_T^(−k).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from auditor import curvature as cv
from auditor.propagation import stage_product_reference
from auditor.steplog import StageSchedule

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# models


class LinearMSE:
    """f(x) = W x + b with MSE; params {"w": [d_out, d_in], "b": [d_out]}."""

    def __init__(self, seed=0, n=40, d_in=3, d_out=2):
        g = torch.Generator().manual_seed(seed)
        self.X = torch.randn(n, d_in, generator=g, dtype=DT)
        self.Y = torch.randn(n, d_out, generator=g, dtype=DT)
        self.theta0 = {"w": 0.3 * torch.randn(d_out, d_in, generator=g, dtype=DT),
                       "b": 0.3 * torch.randn(d_out, generator=g, dtype=DT)}

    def __call__(self, params, stage, ids):
        ids = torch.as_tensor(ids)
        pred = self.X[ids] @ params["w"].T + params["b"]
        return 0.5 * ((pred - self.Y[ids]) ** 2).sum(1).mean()


class TanhMLP:
    """Non-quadratic: f(x) = W2 tanh(W1 x + b1) with MSE (Hessian varies with θ)."""

    def __init__(self, seed=0, n=40, d_in=3, h=4, d_out=2):
        g = torch.Generator().manual_seed(seed)
        self.X = torch.randn(n, d_in, generator=g, dtype=DT)
        self.Y = torch.randn(n, d_out, generator=g, dtype=DT)
        self.theta0 = {"w": 0.5 * torch.randn(h, d_in, generator=g, dtype=DT),
                       "b": 0.1 * torch.randn(h, generator=g, dtype=DT),
                       "w2": 0.5 * torch.randn(d_out, h, generator=g, dtype=DT)}

    def __call__(self, params, stage, ids):
        ids = torch.as_tensor(ids)
        hid = torch.tanh(self.X[ids] @ params["w"].T + params["b"])
        return 0.5 * ((hid @ params["w2"].T - self.Y[ids]) ** 2).sum(1).mean()


class Quadratic:
    """L_B(θ) = mean_{i∈B} ½ (θ − c_i)ᵀ A_i (θ − c_i) over θ = cat(w.flatten(), b).

    A_i = A (shared) or A + perturb · S_i (S_i random symmetric). A has the given spectrum."""

    def __init__(self, seed=0, n_ex=30, w_shape=(2, 3), b_size=3, spectrum=None, shared=True, perturb=0.1):
        g = torch.Generator().manual_seed(seed)
        self.w_shape, self.b_size = w_shape, b_size
        n = int(np.prod(w_shape)) + b_size
        self.n = n
        Qm, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
        if spectrum is None:
            spectrum = torch.linspace(0.1, 2.0, n, dtype=DT)
        A = Qm @ torch.diag(torch.as_tensor(spectrum, dtype=DT)) @ Qm.T
        A = (A + A.T) / 2
        if shared:
            self.A = A.expand(n_ex, n, n).clone()
        else:
            S = torch.randn(n_ex, n, n, generator=g, dtype=DT)
            self.A = A + perturb * (S + S.transpose(1, 2)) / 2
        self.C = torch.randn(n_ex, n, generator=g, dtype=DT)
        self.theta0 = {"w": 0.3 * torch.randn(*w_shape, generator=g, dtype=DT),
                       "b": 0.3 * torch.randn(b_size, generator=g, dtype=DT)}

    def flat(self, params):
        return torch.cat([params["w"].reshape(-1), params["b"].reshape(-1)])

    def __call__(self, params, stage, ids):
        ids = torch.as_tensor(ids)
        d = self.flat(params) - self.C[ids]
        return 0.5 * torch.einsum("bi,bij,bj->b", d, self.A[ids], d).mean()

    def hessian(self, batches):
        return torch.stack([self.A[torch.as_tensor(b)].mean(0) for b in batches]).mean(0)


# --------------------------------------------------------------------------------------------
# schedules and brute-force retraining


def make_stage(name, first, n_steps, *, rng, n_ex, opt="sgd", nesterov=False, reset=True,
               param_group=None, lr=(0.05, 0.15), mom=(0.5, 0.9), wd=(0.0, 0.05), batch=5,
               same_batch=False, zero_momentum=(), b2=(0.9, 0.99)):
    """A StageSchedule with random per-step, per-group hyperparameters.

    zero_momentum: (step, group index or None = all groups) pairs where μ = 0."""
    param_group = param_group or {"w": "decay", "b": "no_decay"}
    groups = sorted(set(param_group.values()), key=lambda g: (g != "decay", g))
    G = len(groups)
    stage_lr = rng.uniform(*lr, size=(n_steps, G))
    momentum = rng.uniform(*mom, size=(n_steps, G)) if opt == "sgd" else np.zeros((n_steps, G))
    for step, gi in zero_momentum:
        if gi is None:
            momentum[step, :] = 0.0
        else:
            momentum[step, gi] = 0.0
    weight_decay = rng.uniform(*wd, size=(n_steps, G))
    if "no_decay" in groups:
        weight_decay[:, groups.index("no_decay")] = 0.0
    fixed = sorted(rng.choice(n_ex, size=batch, replace=False).tolist())
    batches = [fixed if same_batch else sorted(rng.choice(n_ex, size=batch, replace=False).tolist())
               for _ in range(n_steps)]
    kw = {}
    if opt == "adamw":
        kw = dict(beta1=rng.uniform(0.8, 0.95, size=(n_steps, G)), beta2=rng.uniform(*b2, size=(n_steps, G)),
                  eps=np.full((n_steps, G), 1e-8))
    return StageSchedule(stage=name, optimizer=opt, nesterov=nesterov, reset=reset, first_step=first,
                         groups=groups, lr=stage_lr, momentum=momentum, weight_decay=weight_decay,
                         batches=batches, param_group=dict(param_group), **kw)


def _make_opt(st, groups):
    if st.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.1, momentum=0.5, nesterov=st.nesterov)
    return torch.optim.AdamW(groups, lr=0.1)


def _snapshot(opt, names_of):
    if opt is None:
        return None
    if isinstance(opt, torch.optim.SGD):
        return {"momentum_buffer": {names_of[id(p)]: opt.state[p]["momentum_buffer"].detach().clone()
                                    for g in opt.param_groups for p in g["params"]
                                    if opt.state[p].get("momentum_buffer") is not None}}
    out = {"exp_avg": {}, "exp_avg_sq": {}, "step": 0}
    for g in opt.param_groups:
        for p in g["params"]:
            s = opt.state[p]
            if s:
                out["exp_avg"][names_of[id(p)]] = s["exp_avg"].detach().clone()
                out["exp_avg_sq"][names_of[id(p)]] = s["exp_avg_sq"].detach().clone()
                out["step"] = int(s["step"].item())
    return out


def retrain(theta0, stages, loss_fn, skip=None):
    """Brute force with torch.optim. Returns (θ_T, trajectory {t: θ_t}, states {(when, stage): state})."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in theta0.items()}
    names_of = {id(p): k for k, p in params.items()}
    opt, traj, states = None, {}, {}
    t = stages[0].first_step
    for st in stages:
        if st.reset or opt is None:
            groups = [{"params": [params[k] for k in params if st.param_group.get(k) == g], "name": g}
                      for g in st.groups]
            opt = _make_opt(st, groups)
        states[("start", st.stage)] = _snapshot(opt, names_of)
        if st.stage == skip:
            continue
        for i, ids in enumerate(st.batches):
            traj[st.first_step + i] = {k: v.detach().clone() for k, v in params.items()}
            for pg in opt.param_groups:
                c = st.groups.index(pg["name"])
                pg["lr"], pg["weight_decay"] = float(st.lr[i, c]), float(st.weight_decay[i, c])
                if st.optimizer == "sgd":
                    pg["momentum"] = float(st.momentum[i, c])
                else:
                    pg["betas"] = (float(st.beta1[i, c]), float(st.beta2[i, c]))
                    pg["eps"] = float(st.eps[i, c])
            opt.zero_grad()
            loss_fn(params, st.stage, ids).backward()
            opt.step()
        states[("end", st.stage)] = _snapshot(opt, names_of)
        t = st.end_step
    final = {k: v.detach().clone() for k, v in params.items()}
    traj[t] = final
    return final, traj, states


def sub(a, b):
    return {k: a[k] - b[k] for k in a}


def rel_err(a, b):
    num = sum(((a[k] - b[k]) ** 2).sum() for k in a).sqrt()
    den = sum((b[k] ** 2).sum() for k in b).sqrt()
    return float(num / den)


def dot(a, b):
    return float(sum((a[k] * b[k]).sum() for k in a))


def boundary(stages, k, traj, states, like):
    """(Δ_k, δm_{b_k}) of the factual run; δm = SGD buffer difference (zeros for AdamW)."""
    st = stages[k]
    delta = sub(traj[st.end_step], traj[st.first_step])
    dm = {n: torch.zeros_like(v) for n, v in like.items()}
    if st.optimizer == "sgd":
        s0 = (states[("start", st.stage)] or {}).get("momentum_buffer", {})
        s1 = states[("end", st.stage)]["momentum_buffer"]
        for n in s1:
            dm[n] = s1[n] - s0.get(n, torch.zeros_like(s1[n]))
    return delta, dm


def removal(model, stages, k):
    """Brute force for removing stage k: (truth θ_T − θ_T^(−k), Δ_k, δm_{b_k}, factual trajectory,
    factual optimizer states), by retraining with and without the stage."""
    theta_T, traj, states = retrain(model.theta0, stages, model)
    theta_cf, _, _ = retrain(model.theta0, stages, model, skip=stages[k].stage)
    delta, dm = boundary(stages, k, traj, states, model.theta0)
    return sub(theta_T, theta_cf), delta, dm, traj, states


def ckpt_fn(traj, steps=None):
    """checkpoint_at over the recorded steps (all steps of traj when None): nearest at or before t."""
    keys = sorted(traj) if steps is None else sorted(steps)

    def at(t):
        return traj[max(s for s in keys if s <= t)]
    return at


def optstate_fn(states):
    return lambda name: states[("start", name)]


# --------------------------------------------------------------------------------------------
# scenarios


def sgd_scenario(model, seed=1):
    """pre (reset, momentum) → mid (carry; μ=0 at one step for all groups, one step for one group)
    → ft (Nesterov, reset, trains only w: b frozen) → last (Nesterov, carry, only w)."""
    rng = np.random.default_rng(seed)
    n_ex = model.X.shape[0] if hasattr(model, "X") else model.C.shape[0]
    only_w = {"w": "decay"}
    stages = [
        make_stage("pre", 0, 5, rng=rng, n_ex=n_ex),
        make_stage("mid", 5, 6, rng=rng, n_ex=n_ex, reset=False, zero_momentum=[(2, None), (4, 0)]),
        make_stage("ft", 11, 5, rng=rng, n_ex=n_ex, nesterov=True, param_group=only_w),
        make_stage("last", 16, 4, rng=rng, n_ex=n_ex, nesterov=True, reset=False, param_group=only_w,
                   zero_momentum=[(1, None)]),
    ]
    return stages


def adamw_scenario(model, seed=2):
    """pre (SGD) → a1 (AdamW, reset) → a2 (AdamW, carry) → a3 (AdamW, carry)."""
    rng = np.random.default_rng(seed)
    n_ex = model.X.shape[0]
    return [
        make_stage("pre", 0, 3, rng=rng, n_ex=n_ex),
        make_stage("a1", 3, 4, rng=rng, n_ex=n_ex, opt="adamw", lr=(0.01, 0.05), wd=(0.0, 0.1)),
        make_stage("a2", 7, 4, rng=rng, n_ex=n_ex, opt="adamw", reset=False, lr=(0.01, 0.05), wd=(0.0, 0.1)),
        make_stage("a3", 11, 3, rng=rng, n_ex=n_ex, opt="adamw", reset=False, lr=(0.01, 0.05), wd=(0.0, 0.1)),
    ]


# --------------------------------------------------------------------------------------------
# exact tier: forward


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_exact_sgd_equals_retraining(k):
    """Momentum (incl. μ=0 steps), Nesterov, weight decay, two groups, a frozen parameter, resets and
    carries; HVPs at stage-boundary checkpoints only (exact on a quadratic)."""
    model = LinearMSE(seed=3)
    stages = sgd_scenario(model)
    truth, delta, dm, traj, states = removal(model, stages, k)
    at = ckpt_fn(traj, [st.first_step for st in stages])
    counter = cv.HVPCounter()
    e = cv.propagate_exact(delta, dm, stages[k + 1:], model, at, counter=counter)
    assert counter.hvp == sum(st.n_steps for st in stages[k + 1:])
    assert rel_err(e, truth) < 1e-6
    if k < 3:   # the test has teeth: ignoring curvature (AA) is far off
        aa = cv.propagate_spectral(delta, dm, stages[k + 1:], model, at, rank=0)
        assert rel_err(aa, truth) > 1e-2


def test_exact_sgd_carry_momentum_matters():
    """Dropping δm under a carry (treating it as a reset) breaks the exactness: δm is used."""
    model = LinearMSE(seed=4)
    stages = sgd_scenario(model)
    truth, delta, dm, traj, states = removal(model, stages, 0)
    e_wrong = cv.propagate_exact(delta, None, stages[1:], model, ckpt_fn(traj))
    assert rel_err(e_wrong, truth) > 1e-3


@pytest.mark.parametrize("k", [0, 1, 2])
def test_exact_adamw_secant_equals_retraining(k):
    """Secant step with checkpoints at every step (the factual trajectory): exact on a quadratic,
    through an AdamW reset and carries (counterfactual state = the state at a_k)."""
    model = LinearMSE(seed=5)
    stages = adamw_scenario(model)
    truth, delta, dm, traj, states = removal(model, stages, k)
    e = cv.propagate_exact(delta, dm, stages[k + 1:], model, ckpt_fn(traj),
                           optimizer_state_at_stage_start=optstate_fn(states),
                           cf_optimizer_state=states[("start", stages[k].stage)])
    assert rel_err(e, truth) < 1e-6
    # AA (Adam moments unchanged) misses the gradient-driven part
    aa = cv.propagate_spectral(delta, dm, stages[k + 1:], model, ckpt_fn(traj), rank=0)
    assert rel_err(aa, truth) > 1e-3


def test_exact_adamw_sparse_checkpoints_is_an_approximation():
    """With boundary checkpoints only the factual gradient is approximate: finite, close, not exact."""
    model = LinearMSE(seed=5)
    stages = adamw_scenario(model)
    truth, delta, dm, traj, states = removal(model, stages, 1)
    e = cv.propagate_exact(delta, dm, stages[2:], model, ckpt_fn(traj, [0, 3, 7, 11]),
                           optimizer_state_at_stage_start=optstate_fn(states), cf_optimizer_state=None)
    err = rel_err(e, truth)
    assert np.isfinite(err) and err < 0.5


def test_adamw_carry_requires_cf_state():
    model = LinearMSE(seed=5)
    stages = adamw_scenario(model)
    _, traj, states = retrain(model.theta0, stages, model)
    delta, dm = boundary(stages, 1, traj, states, model.theta0)
    with pytest.raises(ValueError, match="cf_optimizer_state"):
        cv.propagate_exact(delta, dm, stages[2:], model, ckpt_fn(traj),
                           optimizer_state_at_stage_start=optstate_fn(states))


def test_empty_param_group_rejected():
    model = LinearMSE(seed=5)
    stages = sgd_scenario(model)
    stages[1].param_group = {}
    with pytest.raises(ValueError, match="param_group"):
        cv.propagate_exact(model.theta0, None, stages[1:], model, lambda t: model.theta0)


# --------------------------------------------------------------------------------------------
# exact tier: adjoint


@pytest.mark.parametrize("model_cls", [LinearMSE, TanhMLP])
def test_adjoint_equals_forward(model_cls):
    """One backward sweep gives, at every boundary, v with v·(Δ, δm) = ∇f · propagate_exact(Δ, δm).
    TanhMLP: the Hessian varies with θ, both use the same sparse checkpoints."""
    model = model_cls(seed=6)
    rng = np.random.default_rng(7)
    pg = {k: ("no_decay" if k == "b" else "decay") for k in model.theta0}
    only_w = {k: "decay" for k in model.theta0 if k != "b"}
    n_ex = model.X.shape[0]
    stages = [
        make_stage("pre", 0, 5, rng=rng, n_ex=n_ex, param_group=pg),
        make_stage("mid", 5, 6, rng=rng, n_ex=n_ex, reset=False, param_group=pg, zero_momentum=[(2, None), (4, 0)]),
        make_stage("ft", 11, 5, rng=rng, n_ex=n_ex, nesterov=True, param_group=only_w),
        make_stage("last", 16, 4, rng=rng, n_ex=n_ex, nesterov=True, reset=False, param_group=only_w,
                   zero_momentum=[(1, None)]),
    ]
    _, traj, states = retrain(model.theta0, stages, model)
    at = ckpt_fn(traj, [0, 3, 5, 11, 14, 16])
    g = torch.Generator().manual_seed(8)
    grad_f = {k: torch.randn(v.shape, generator=g, dtype=DT) for k, v in model.theta0.items()}
    sweep = cv.adjoint_sweep(grad_f, stages, model, at)
    assert len(sweep) == len(stages) + 1
    for k in range(len(stages)):
        delta, dm = boundary(stages, k, traj, states, model.theta0)
        e = cv.propagate_exact(delta, dm, stages[k + 1:], model, at)
        fwd = dot(grad_f, e)
        vth, vm = sweep[k + 1]
        adj = dot(vth, delta) + dot(vm, dm)
        assert abs(adj - fwd) <= 1e-8 * max(abs(fwd), 1e-12), (k, adj, fwd)
    vth0, vm0 = cv.adjoint_exact(grad_f, stages[1:], model, at)
    assert rel_err(vth0, sweep[1][0]) < 1e-14
    assert all(float(v.abs().max()) == 0.0 for v in sweep[2][1].values())   # 'ft' resets: v_m = 0


def test_adjoint_rejects_adamw():
    model = LinearMSE(seed=5)
    stages = adamw_scenario(model)
    with pytest.raises(ValueError, match="SGD stages only"):
        cv.adjoint_sweep(model.theta0, stages[1:], model, lambda t: model.theta0)


# --------------------------------------------------------------------------------------------
# Lanczos


def test_lanczos_algebraically_largest_and_full_spectrum():
    g = torch.Generator().manual_seed(0)
    n = 30
    Qm, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    spec = torch.cat([torch.tensor([3.0, 2.5, 2.0], dtype=DT), torch.linspace(-10, 1, n - 3, dtype=DT)])
    A = Qm @ torch.diag(spec) @ Qm.T
    A = (A + A.T) / 2
    ref = torch.linalg.eigvalsh(A).flip(0)
    vals, vecs, nmv = cv.lanczos_top(lambda v: A @ v, n, 3)
    assert nmv == min(n, 3 * 3 + 20)
    assert torch.allclose(vals, ref[:3], atol=1e-8)                   # not the −10 of largest magnitude
    assert torch.allclose(A @ vecs, vecs * vals, atol=1e-6)
    vals, vecs, nmv = cv.lanczos_top(lambda v: A @ v, n, n, n_iter=n)   # full: every eigenpair
    assert nmv == n and torch.allclose(vals, ref, atol=1e-9)
    # repeated eigenvalues: the breakdown restart still finds all copies
    B = Qm @ torch.diag(torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0] + [0.5] * (n - 5), dtype=DT)) @ Qm.T
    vals, vecs, _ = cv.lanczos_top(lambda v: B @ v, n, n, n_iter=n)
    assert torch.allclose(vals, torch.linalg.eigvalsh(B).flip(0), atol=1e-9)
    assert torch.allclose(vecs.T @ vecs, torch.eye(n, dtype=DT), atol=1e-9)


def test_segment_bounds():
    rng = np.random.default_rng(0)
    sts = [make_stage("a", 0, 10, rng=rng, n_ex=20), make_stage("b", 10, 5, rng=rng, n_ex=20)]
    assert cv.segment_bounds(sts, [0, 4, 10, 12, 15]) == [(0, 0, 4), (0, 4, 10), (1, 10, 12), (1, 12, 15)]
    assert cv.segment_bounds(sts) == [(0, 0, 10), (1, 10, 15)]


# --------------------------------------------------------------------------------------------
# spectral tier


def _const_quadratic_stages(model, later_steps, seed=11, later_kw=None):
    rng = np.random.default_rng(seed)
    n_ex = model.C.shape[0]
    st0 = make_stage("pre", 0, 4, rng=rng, n_ex=n_ex)
    later, t = [], 4
    for j, (n, kw) in enumerate(zip(later_steps, later_kw or [{}] * len(later_steps))):
        later.append(make_stage(f"s{j}", t, n, rng=rng, n_ex=n_ex, **kw))
        t += n
    return [st0, *later]


@pytest.mark.parametrize("cuts", [None, [4, 7, 12, 14, 16]])
def test_spectral_full_rank_constant_hessian_equals_retraining(cuts):
    """Same A at every step (batches differ: only c_i changes): the spectral model at full rank is
    the exact dynamics, across a carry (μ=0 steps, two groups with different η, μ, λ) and a Nesterov reset,
    with one segment per stage or several (cuts)."""
    model = Quadratic(seed=12, shared=True)
    stages = _const_quadratic_stages(model, [8, 8], later_kw=[
        dict(reset=False, zero_momentum=[(1, None), (3, 1)], wd=(0.01, 0.1)),
        dict(nesterov=True, wd=(0.01, 0.1))])
    truth, delta, dm, traj, states = removal(model, stages, 0)
    counter = cv.HVPCounter()
    e = cv.propagate_spectral(delta, dm, stages[1:], model, ckpt_fn(traj, [0, 4, 12]), cuts,
                              rank=model.n, counter=counter)
    assert rel_err(e, truth) < 1e-6
    assert rel_err(cv.propagate_spectral(delta, dm, stages[1:], model, ckpt_fn(traj), rank=0), truth) > 1e-2


def test_spectral_hvp_count_independent_of_segment_length():
    model = Quadratic(seed=13, n_ex=30, w_shape=(5, 6), b_size=10, shared=False)
    counts = []
    for n_steps in (10, 40):
        stages = _const_quadratic_stages(model, [n_steps])
        counter = cv.HVPCounter()
        segs = cv.spectral_segments(stages[1:], model, lambda t: model.theta0, model.theta0, rank=3,
                                    n_batches=4, counter=counter)
        assert len(segs) == 1
        counts.append((counter.hvp, segs[0].n_hvp, counter.batch_hvp))
    assert counts[0] == counts[1]
    assert counts[0][0] == 3 * 3 + 20 < model.n
    assert counts[0][2] == counts[0][0] * 4


def _dense_reference(model, later, segs, delta, dm, P=None):
    """Slow reference: the same constant-H model propagated with dense matrices, step by step.

    H_r = U h Uᵀ from numpy's eigh of the dense batch-averaged Hessian (top-r algebraically largest);
    SGD: m' = μm + (H_r + λ)θ, θ' = θ − η(m' | δg + μm'); μ=0 keeps m. AdamW (frozen P):
    x = P^-½θ, y = P^½m, H̃ = P^½HP^½ truncated, y' = β1y + (1−β1)H̃x, x' = (1−ηλ)x − η/(1−β1^k) y'."""
    keys = list(delta)
    sizes = [delta[k].numel() for k in keys]
    th = torch.cat([delta[k].reshape(-1) for k in keys]).numpy().copy()
    m = torch.cat([dm[k].reshape(-1) for k in keys]).numpy().copy()
    for j, st in enumerate(later):
        if st.reset or (j == 0 and st.optimizer == "adamw"):
            m[:] = 0
        cols = np.concatenate([np.full(s, st.groups.index(st.param_group[k]) if k in st.param_group else -1)
                               for k, s in zip(keys, sizes)])
        frozen = cols < 0
        cc = np.where(frozen, 0, cols)
        for seg in [s for s in segs if s.stage == st.stage]:
            H = model.hessian([st.batches[t - st.first_step] for t in seg.batch_steps]).numpy()
            r = seg.eigenvalues.numel()
            if st.optimizer == "adamw":
                sq = np.sqrt(P)
                Ht = sq[:, None] * H * sq[None, :]
                w, V = np.linalg.eigh(Ht)
                w, V = w[::-1][:r], V[:, ::-1][:, :r]
                Hr = (V * w) @ V.T
                x, y = th / sq, m * sq
                for t in range(seg.start, seg.end):
                    i = t - st.first_step
                    eta = np.where(frozen, 0, st.lr[i, cc])
                    lam = st.weight_decay[i, cc]
                    b1 = np.where(frozen, 1.0, st.beta1[i, cc])
                    k = seg.adam_step0 + i + 1
                    etak = np.where(frozen, 0, eta / (1 - b1 ** k))
                    y = b1 * y + (1 - b1) * (Hr @ x)
                    x = (1 - eta * lam) * x - etak * y
                th, m = x * sq, y / sq
            else:
                w, V = np.linalg.eigh(H)
                w, V = w[::-1][:r], V[:, ::-1][:, :r]
                Hr = (V * w) @ V.T
                for t in range(seg.start, seg.end):
                    i = t - st.first_step
                    eta = np.where(frozen, 0, st.lr[i, cc])
                    mu = np.where(frozen, 0, st.momentum[i, cc])
                    lam = np.where(frozen, 0, st.weight_decay[i, cc])
                    dg = Hr @ th + lam * th
                    m_new = np.where(mu != 0, mu * m + dg, m)
                    upd = np.where(mu != 0, (dg + mu * m_new) if st.nesterov else m_new, dg)
                    th, m = th - eta * upd, m_new
    out, off = {}, 0
    for k, s in zip(keys, sizes):
        out[k] = torch.as_tensor(th[off:off + s]).reshape(delta[k].shape)
        off += s
    return out


def test_spectral_low_rank_matches_dense_reference_sgd():
    """Rank 3 < n with 29 Lanczos steps on n = 40; per-example Hessians (H varies by batch), two groups
    with different hyperparameters, μ=0 steps, Nesterov, a frozen parameter, two segments per stage."""
    spec = torch.cat([torch.tensor([6.0, 5.0, 4.0], dtype=DT), torch.linspace(0.0, 1.0, 37, dtype=DT)])
    model = Quadratic(seed=14, n_ex=30, w_shape=(5, 6), b_size=10, spectrum=spec, shared=False, perturb=0.05)
    stages = _const_quadratic_stages(model, [10, 8], later_kw=[
        dict(reset=False, zero_momentum=[(1, None), (3, 1)], wd=(0.01, 0.1), lr=(0.01, 0.05)),
        dict(nesterov=True, param_group={"w": "decay"}, lr=(0.01, 0.05))])
    g = torch.Generator().manual_seed(1)
    delta = {k: torch.randn(v.shape, generator=g, dtype=DT) for k, v in model.theta0.items()}
    dm = {k: torch.randn(v.shape, generator=g, dtype=DT) for k, v in model.theta0.items()}
    segs = cv.spectral_segments(stages[1:], model, lambda t: model.theta0, delta, [4, 9, 14, 18, 22], rank=3)
    assert len(segs) == 4 and all(s.n_hvp == 29 for s in segs)
    e = cv.propagate_spectral(delta, dm, stages[1:], segments=segs)
    ref = _dense_reference(model, stages[1:], segs, delta, dm)
    assert rel_err(e, ref) < 1e-8
    aa = cv.propagate_spectral(delta, dm, stages[1:], model, lambda t: model.theta0, rank=0)
    assert rel_err(aa, ref) > 1e-3


def test_spectral_low_rank_matches_dense_reference_adamw():
    spec = torch.cat([torch.tensor([6.0, 5.0, 4.0], dtype=DT), torch.linspace(0.0, 1.0, 37, dtype=DT)])
    model = Quadratic(seed=15, n_ex=30, w_shape=(5, 6), b_size=10, spectrum=spec, shared=False, perturb=0.05)
    rng = np.random.default_rng(3)
    later = [make_stage("a1", 4, 6, rng=rng, n_ex=30, opt="adamw", lr=(0.01, 0.05), wd=(0.0, 0.1)),
             make_stage("a2", 10, 5, rng=rng, n_ex=30, opt="adamw", reset=False, lr=(0.01, 0.05), wd=(0.0, 0.1))]
    g = torch.Generator().manual_seed(2)
    P = torch.rand(model.n, generator=g, dtype=DT) + 0.5
    prec = lambda s: {"w": P[:30].reshape(5, 6), "b": P[30:]}  # noqa: E731
    delta = {k: torch.randn(v.shape, generator=g, dtype=DT) for k, v in model.theta0.items()}
    dm = {k: torch.randn(v.shape, generator=g, dtype=DT) for k, v in model.theta0.items()}
    segs = cv.spectral_segments(later, model, lambda t: model.theta0, delta, rank=3, adam_preconditioner=prec)
    assert [s.adam_step0 for s in segs] == [0, 6]
    e = cv.propagate_spectral(delta, dm, later, segments=segs)
    ref = _dense_reference(model, later, segs, delta, dm, P=P.numpy())
    assert rel_err(e, ref) < 1e-8


def test_spectral_adam_preconditioner_estimate():
    """Fresh AdamW stage: P = 1/(√G2 + ε), G2 = mean_b g_b² at the checkpoint. Carry at the stage start:
    P = 1/(√(v0/(1 − β2^k0)) + ε) from the recorded state."""
    model = LinearMSE(seed=5)
    stages = adamw_scenario(model)
    _, traj, states = retrain(model.theta0, stages, model)
    at = ckpt_fn(traj, [0, 3, 7, 11])
    segs = cv.spectral_segments(stages[1:3], model, at, model.theta0, rank=2, n_batches=3,
                                optimizer_state_at_stage_start=optstate_fn(states))
    s1, s2 = segs
    st1 = stages[1]
    G2 = 0
    for t in s1.batch_steps:
        p = {k: v.clone().requires_grad_(True) for k, v in traj[3].items()}
        gr = torch.autograd.grad(model(p, "a1", st1.batches[t - 3]), [p["w"], p["b"]])
        G2 = G2 + torch.cat([x.reshape(-1) for x in gr]) ** 2 / len(s1.batch_steps)
    assert torch.allclose(s1.sqrt_precond, (1 / (G2.sqrt() + 1e-8)).sqrt(), rtol=1e-10)
    rec = states[("start", "a2")]
    k0 = rec["step"]
    assert s2.adam_step0 == k0 == 4
    b2 = stages[2].beta2[0]
    v0 = torch.cat([rec["exp_avg_sq"]["w"].reshape(-1) / (1 - b2[0] ** k0),
                    rec["exp_avg_sq"]["b"] / (1 - b2[1] ** k0)])
    assert torch.allclose(s2.sqrt_precond, (1 / (v0.sqrt() + 1e-8)).sqrt(), rtol=1e-10)


def test_spectral_rank0_is_aa():
    """Rank 0: each group by the product of the §3.1 2×2 matrices, e = αΔ + βδm (the step-by-step
    reference product of auditor.propagation, explicit matrices, not the spectral code path)."""
    model = LinearMSE(seed=9)
    stages = sgd_scenario(model)
    rng = np.random.default_rng(5)
    stages.append(make_stage("adam", 20, 4, rng=rng, n_ex=40, opt="adamw", wd=(0.05, 0.1)))
    g = torch.Generator().manual_seed(3)
    delta = {k: torch.randn(v.shape, generator=g, dtype=DT) for k, v in model.theta0.items()}
    dm = {k: torch.randn(v.shape, generator=g, dtype=DT) for k, v in model.theta0.items()}
    later = stages[1:]
    e = cv.propagate_spectral(delta, dm, later, model, lambda t: model.theta0, rank=0)
    for name in delta:
        M = np.eye(2)
        for j, st in enumerate(later):
            if st.reset:
                M = np.diag([1.0, 0.0]) @ M
            gname = st.param_group.get(name)
            if gname is not None:  # a parameter outside the stage's groups is frozen: identity
                M = stage_product_reference(st, gname) @ M
        alpha, beta = M[0]
        assert torch.allclose(e[name], alpha * delta[name] + beta * dm[name], rtol=1e-12, atol=1e-14)


def test_spectral_one_step_segments_full_rank_equals_exact_nonquadratic():
    """Non-quadratic consistency: with a segment per step, one batch per segment (the step's own) and
    full rank, the spectral model *is* the exact tier's linear step (same H_t at the same checkpoint)."""
    model = TanhMLP(seed=3)
    rng = np.random.default_rng(0)
    pg = {"w": "decay", "w2": "decay", "b": "no_decay"}
    stages = [make_stage("a", 0, 6, rng=rng, n_ex=40, param_group=pg, nesterov=True, reset=False,
                         zero_momentum=[(2, None), (3, 1)]),
              make_stage("b", 6, 5, rng=rng, n_ex=40, param_group=pg, reset=False)]
    _, traj, _ = retrain(model.theta0, stages, model)
    g = torch.Generator().manual_seed(1)
    D = {k: torch.randn(v.shape, generator=g, dtype=DT) for k, v in model.theta0.items()}
    M = {k: torch.randn(v.shape, generator=g, dtype=DT) for k, v in model.theta0.items()}
    n = sum(v.numel() for v in D.values())
    ex = cv.propagate_exact(D, M, stages, model, ckpt_fn(traj))
    sp = cv.propagate_spectral(D, M, stages, model, ckpt_fn(traj), list(range(12)), rank=n, n_batches=1)
    assert rel_err(sp, ex) < 1e-9
    assert rel_err(cv.propagate_exact(D, None, stages, model, ckpt_fn(traj)), ex) > 1e-3   # δm is used


def test_hvp_matches_dense_hessian():
    model = TanhMLP(seed=4)
    keys = list(model.theta0)
    sizes = [model.theta0[k].numel() for k in keys]
    ids = [1, 4, 7, 9]

    def flat_loss(v):
        parts = torch.split(v, sizes)
        return model({k: p.reshape(model.theta0[k].shape) for k, p in zip(keys, parts)}, "s", ids)
    th = torch.cat([model.theta0[k].reshape(-1) for k in keys])
    H = torch.autograd.functional.hessian(flat_loss, th)
    g = torch.Generator().manual_seed(0)
    v = {k: torch.randn(model.theta0[k].shape, generator=g, dtype=DT) for k in keys}
    hv, grad = cv.hessian_vector_product(model, model.theta0, "s", ids, v, with_grad=True)
    ref = H @ torch.cat([v[k].reshape(-1) for k in keys])
    assert torch.allclose(torch.cat([hv[k].reshape(-1) for k in keys]), ref, atol=1e-12)
    gref = torch.autograd.functional.jacobian(flat_loss, th)
    assert torch.allclose(torch.cat([grad[k].reshape(-1) for k in keys]), gref, atol=1e-12)


# --------------------------------------------------------------------------------------------
# secant tier: gradient differences instead of HVPs


@pytest.mark.parametrize("k", [0, 1, 2])
def test_secant_sgd_equals_retraining_on_quadratic(k):
    """On a quadratic ∇L(θ) − ∇L(θ − δ) = H δ exactly, so the secant tier equals the exact tier
    and retraining, with stage-boundary checkpoints only."""
    model = LinearMSE(seed=3)
    stages = sgd_scenario(model)
    truth, delta, dm, traj, states = removal(model, stages, k)
    at = ckpt_fn(traj, [st.first_step for st in stages])
    e = cv.propagate_exact(delta, dm, stages[k + 1:], model, at, curvature="secant")
    assert rel_err(e, truth) < 1e-6


@pytest.mark.parametrize("k", [0, 1])
def test_secant_sgd_with_every_checkpoint_is_retraining_on_a_nonquadratic(k):
    """With θ_c = θ_t (checkpoints at every step) the secant step computes the counterfactual
    gradient ∇L(θ_t − δθ_t) exactly, so for SGD it reproduces retraining on any loss; the HVP
    (exact) tier does not on a non-quadratic loss — the difference is the nonlinearity the secant
    form keeps."""
    model = TanhMLP(seed=7)
    stages = sgd_scenario(model)
    truth, delta, dm, traj, states = removal(model, stages, k)
    e = cv.propagate_exact(delta, dm, stages[k + 1:], model, ckpt_fn(traj), curvature="secant")
    assert rel_err(e, truth) < 1e-6
    e_hvp = cv.propagate_exact(delta, dm, stages[k + 1:], model, ckpt_fn(traj))
    assert rel_err(e_hvp, truth) > 1e-6


def test_secant_adamw_equals_retraining_on_quadratic():
    model = LinearMSE(seed=5)
    stages = adamw_scenario(model)
    truth, delta, dm, traj, states = removal(model, stages, 1)
    e = cv.propagate_exact(delta, dm, stages[2:], model, ckpt_fn(traj), curvature="secant",
                           optimizer_state_at_stage_start=optstate_fn(states),
                           cf_optimizer_state=states[("start", stages[1].stage)])
    assert rel_err(e, truth) < 1e-6


# --------------------------------------------------------------------------------------------
# the exact tier's settings in the audit: curvature product and forward/adjoint choice


def test_unknown_curvature_is_refused():
    from auditor import AuditConfig
    from auditor.errors import AuditorError

    with pytest.raises(AuditorError, match="curvature 'newton'; expected one of secant, hessian"):
        AuditConfig(curvature="newton")
    with pytest.raises(ValueError, match="curvature"):
        model = LinearMSE(seed=3)
        stages = sgd_scenario(model)
        cv.propagate_exact(model.theta0, None, stages[1:], model, lambda t: model.theta0, curvature="newton")


def test_direction_choice_counts_products():
    """Forward: Σ_k (steps after stage k). Adjoint: one sweep back to the end of stage 1 per covector."""
    from auditor.audit import exact_tier_direction

    later = [300, 100, 0]  # steps after each of 3 stages
    d = exact_tier_direction(later, 597, "hessian", True)
    assert (d["direction"], d["forward_products"], d["adjoint_products"]) == ("forward", 400, 597 * 300)
    assert "cheaper" in d["reason"]
    # one covector, many stages: the adjoint would be cheaper — the report must say why it is not used
    d = exact_tier_direction([900, 800, 700, 600, 0], 1, "hessian", True)
    assert d["adjoint_products"] == 900 < d["forward_products"] == 3000
    assert "linear form" in d["reason"]
    assert exact_tier_direction(later, 1, "secant", True)["adjoint_products"] is None
    assert "SGD" in exact_tier_direction(later, 1, "hessian", False)["reason"]


@pytest.mark.parametrize("kwargs, message", [
    ({"tiers": "exact"}, "tiers 'exact'; expected a tuple of tier names"),
    ({"tiers": None}, "tiers None; expected a tuple"),
    ({"tiers": ("secant",)}, "tier 'secant'; expected any of exact, spectral"),
    ({"rank": 2.5}, "rank 2.5; expected an integer >= 1"),
    ({"rank": True}, "rank True; expected an integer >= 1"),
    ({"spectral_batches": 0}, "expected >= 1"),
    ({"eval_chunk": 1.5}, "eval_chunk 1.5; expected a positive integer or None"),
])
def test_audit_config_refuses_bad_settings(kwargs, message):
    from auditor import AuditConfig
    from auditor.errors import AuditorError

    with pytest.raises(AuditorError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        AuditConfig(**kwargs)
    assert AuditConfig(tiers=["exact"]).tiers == ("exact",)
