"""Orchestration: a validated pipeline in, an :class:`AuditResult` out.

    result = estimate(load_pipeline("pipeline.yaml"))
    result.to_dict()          # the numbers, as written to results.json
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .behaviors import EvalData, aggregate, data_key, kind_fn, load_eval_source, logits_fn, subset_mask
from .checkpoints import load_momentum, load_params, load_tensors
from .errors import AuditorError
from .estimators import ESTIMATORS, axpy, embedding
from .fidelity import compare, judged_by_diagnostics
from .jsonsafe import sanitize, sha256_file
from .pipeline import Pipeline, call_user, load_pipeline
from .propagation import propagation_coefficients

Progress = Callable[[str, float], None]
TIERS = ("exact", "spectral")
CURVATURES = ("secant", "hessian")


@dataclass
class AuditConfig:
    """Settings of one audit.

    device: "auto" (CUDA when available, else CPU), "cpu" or "cuda[:i]".
    dtype: "float64" (default: the exactness checks need it) or "float32".
    eval_chunk: evaluation examples per forward pass (None = all at once).
    build: build missing sample artifacts with the YAML's build.factory.
    retrain: compute the truth by replaying later stages (training.replay) instead of reading the
        stages' counterfactual_checkpoint files.
    tiers: curvature-aware tiers to add (ESTIMATORS.md §3.2): "exact" (the boundary difference
        carried through every later step on that step's batch, at the nearest recorded checkpoint)
        and/or "spectral" (top-``rank`` eigen-directions of each segment's Hessian, averaged over
        ``spectral_batches`` batches). Both need the YAML's training.data; their estimates use the
        shifted form. The most accurate tier present (exact, then spectral) becomes the headline
        estimator; otherwise AA's shifted form.
    curvature: the exact tier's curvature product per later step. "secant" (default): the
        Hessian averaged along the segment between the checkpoint θ_c and θ_c − δθ, applied to
        δθ — exactly ∇L(θ_c) − ∇L(θ_c − δθ), two gradients; "hessian": the Hessian at θ_c, one
        Hessian-vector product. Equal on quadratic losses; on the digits sample's first stage
        (weights moved by 66 % of their norm) the secant product lifts per-example Spearman from
        0.15 to 0.84 (benchmarks/fidelity.py).
    """

    device: str = "auto"
    dtype: str = "float64"
    eval_chunk: int | None = 4096
    build: bool = True
    retrain: bool = False
    tiers: tuple[str, ...] = ()
    curvature: str = "secant"
    rank: int = 20
    spectral_batches: int = 4

    def __post_init__(self):
        if isinstance(self.tiers, str) or not isinstance(self.tiers, (tuple, list)):
            raise AuditorError(f"tiers {self.tiers!r}; expected a tuple of tier names, e.g. ('exact',)",
                               where="config.tiers")
        self.tiers = tuple(self.tiers)
        for name in ("rank", "spectral_batches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise AuditorError(f"{name} {v!r}; expected an integer >= 1", where=f"config.{name}")
        if self.eval_chunk is not None and (isinstance(self.eval_chunk, bool) or not isinstance(self.eval_chunk, int)):
            raise AuditorError(f"eval_chunk {self.eval_chunk!r}; expected a positive integer or None",
                               where="config.eval_chunk")
        if self.dtype not in ("float64", "float32"):
            raise AuditorError(f"dtype {self.dtype!r}; expected 'float64' or 'float32'", where="config.dtype")
        if self.eval_chunk is not None and self.eval_chunk < 1:
            raise AuditorError(f"eval_chunk {self.eval_chunk}; expected a positive integer or None",
                               where="config.eval_chunk")
        bad = [t for t in self.tiers if t not in TIERS]
        if bad:
            raise AuditorError(f"tier {bad[0]!r}; expected any of {', '.join(TIERS)}", where="config.tiers")
        if self.curvature not in CURVATURES:
            raise AuditorError(f"curvature {self.curvature!r}; expected one of {', '.join(CURVATURES)}",
                               where="config.curvature")
        if self.rank < 1 or self.spectral_batches < 1:
            raise AuditorError(f"rank {self.rank}, spectral_batches {self.spectral_batches}; expected >= 1",
                               where="config.rank")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise AuditorError(f"device {self.device!r}; expected 'auto', 'cpu' or 'cuda[:i]'", where="config.device")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise AuditorError(f"device {self.device!r} requested but CUDA is not available", where="config.device")
        return torch.device(self.device)


@dataclass
class InputRecord:
    role: str
    path: Path
    sha256: str
    bytes: int


@dataclass
class AuditResult:
    """The numbers of one audit. ``data`` is the JSON-able dict (docs/DESIGN.md);
    ``images`` maps behaviour name → eval inputs reshaped to images [N, H, W] where the YAML gives image_shape."""

    data: dict
    pipeline: Pipeline
    inputs: list[InputRecord] = field(default_factory=list)
    images: dict[str, np.ndarray] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)  # seconds; kept out of ``data`` (reproducible bytes)

    def to_dict(self) -> dict:
        return self.data


def generated_at() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            t = _dt.datetime.fromtimestamp(int(epoch), tz=_dt.timezone.utc)
        except (ValueError, OverflowError, OSError):
            raise AuditorError(f"SOURCE_DATE_EPOCH={epoch[:30]!r}; expected seconds since 1970 (a non-negative "
                               "integer before year 9999)") from None
        if int(epoch) < 0:
            raise AuditorError(f"SOURCE_DATE_EPOCH={epoch!r}; expected a non-negative integer") from None
    else:
        t = _dt.datetime.now(tz=_dt.timezone.utc).replace(microsecond=0)
    return t.isoformat().replace("+00:00", "Z")


def _norm(d: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in d.values())))


def _sub(a: dict, b: dict) -> dict:
    return {p: a[p] - b[p] for p in a}


def _num(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None


def estimate(pipeline: Pipeline | str | Path, config: AuditConfig | None = None,
             progress: Progress | None = None) -> AuditResult:
    """Run the AA estimators (naive, linear, midpoint, shifted) for every stage and behaviour."""
    if not isinstance(pipeline, Pipeline):
        pipeline = load_pipeline(pipeline)
    config = config or AuditConfig()
    say = progress or (lambda msg, frac: None)
    if config.build:
        pipeline.ensure_artifacts(progress)
    pipeline.check_files(truth=not config.retrain)
    device, dtype = config.torch_device(), getattr(torch, config.dtype)

    inputs: list[InputRecord] = []

    def record(role: str, path: Path):
        if all(r.path != path for r in inputs):
            inputs.append(InputRecord(role, path, *sha256_file(path)))

    record("pipeline", pipeline.path.resolve())
    model = pipeline.build_model().to(device=device, dtype=dtype)
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    schedules = pipeline.load_schedules(names)
    for s in pipeline.stages:
        record(f"log:{s.name}", s.log)

    K = len(pipeline.stages)
    last = pipeline.stages[-1]
    theta_T = load_params(last.end_checkpoint, names, shapes, dtype=dtype, device=device)
    final_sd = load_tensors(last.end_checkpoint)
    buffers = {n: final_sd[n].to(device) if n in final_sd else b for n, b in model.named_buffers()}
    buffers = {n: (b.to(dtype) if b.is_floating_point() else b) for n, b in buffers.items()}

    # ---- stage embeddings -------------------------------------------------------------------
    say("loading checkpoints and propagating stage differences", 0.05)
    starts, deltas, embeds, coeffs_all, dmoms = [], [], [], [], []
    aa_embed_s = 0.0
    for k, s in enumerate(pipeline.stages):
        record(f"checkpoint:{s.name}:start", s.start_checkpoint)
        record(f"checkpoint:{s.name}:end", s.end_checkpoint)
        a = load_params(s.start_checkpoint, names, shapes, dtype=dtype, device=device)
        b = theta_T if k == K - 1 else load_params(s.end_checkpoint, names, shapes, dtype=dtype, device=device)
        delta = _sub(b, a)
        if s.optimizer == "sgd":
            if s.optimizer_state is not None:
                record(f"optimizer_state:{s.name}", s.optimizer_state)
            m_b = load_momentum(s.optimizer_state, names, shapes, dtype=dtype, device=device)
            prev = pipeline.stages[k - 1] if k > 0 else None
            m_a = load_momentum(None if s.reset else prev.optimizer_state, names, shapes, dtype=dtype, device=device)
            dmom = _sub(m_b, m_a)
        else:  # AdamW: a carried Adam-state difference is neglected (ESTIMATORS.md §3.1)
            dmom = {n: torch.zeros_like(delta[n]) for n in names}
        t_aa = time.perf_counter()
        coeffs = propagation_coefficients(schedules, k, names)
        embeds.append(embedding(delta, dmom, coeffs))
        aa_embed_s += time.perf_counter() - t_aa
        starts.append(a)
        deltas.append(delta)
        dmoms.append(dmom)
        coeffs_all.append(coeffs)

    tier_embeds: dict[str, list[dict]] = {}
    if config.tiers:
        tier_embeds, timing_tiers = _curvature_embeddings(pipeline, config, model, buffers, names, shapes, schedules,
                                                          deltas, dmoms, theta_T, dtype, device, say)
    else:
        timing_tiers = {}

    weight_norm = _norm(theta_T)
    stage_rows = []
    for k, (s, sched) in enumerate(zip(pipeline.stages, schedules)):
        later_motion = _norm({n: theta_T[n] - starts[k][n] - deltas[k][n] for n in names})  # ‖θ_T − θ_{b_k}‖
        stage_rows.append({
            "name": s.name, "description": s.description, "owner": s.owner, "optimizer": s.optimizer,
            "nesterov": s.nesterov, "reset": s.reset, "first_step": sched.first_step, "end_step": sched.end_step,
            "n_steps": sched.n_steps, "groups": sched.groups,
            "param_groups": {g.name: g.patterns for g in s.param_groups},
            "alpha": {n: coeffs_all[k][n][0] for n in names}, "beta": {n: coeffs_all[k][n][1] for n in names},
            "delta_norm": _norm(deltas[k]), "momentum_delta_norm": _norm(dmoms[k]),
            "embedding_norm": _norm(embeds[k]), "weight_norm": weight_norm,
            "later_motion_norm": later_motion,
            "schedule": {g: {"step": list(range(sched.first_step, sched.end_step)),
                             "lr": sched.lr[:, j].tolist(), "momentum": sched.momentum[:, j].tolist(),
                             "weight_decay": sched.weight_decay[:, j].tolist()}
                         for j, g in enumerate(sched.groups)},
            "counterfactual_checkpoint": str(s.counterfactual_checkpoint) if s.counterfactual_checkpoint else None,
        })

    cf_params = {}
    timing = {"estimate_s": 0.0, "aa_embedding_s": aa_embed_s, **timing_tiers}
    truth_source = "counterfactual checkpoints"
    if config.retrain:
        from .retrain import retrain_counterfactuals

        sub = (lambda msg, frac: progress(msg, 0.05 + 0.05 * frac)) if progress else None  # within 5–10 %
        retrained, timing["retrain_s"] = retrain_counterfactuals(pipeline, model, sub)
        cf_params = {name: {n: sd[n].to(device=device, dtype=dtype) for n in names} for name, sd in retrained.items()}
        truth_source = "retraining (training.replay)"
    estimator_names = [*ESTIMATORS, *tier_embeds]
    primary_name = next((t for t in ("exact", "spectral") if t in tier_embeds), "shifted")
    t_est = time.perf_counter()
    form_s: dict[str, float] = {}
    for s in pipeline.stages:
        if s.name not in cf_params and s.counterfactual_checkpoint is not None and not config.retrain:
            record(f"truth:{s.name}", s.counterfactual_checkpoint)
            cf_params[s.name] = load_params(s.counterfactual_checkpoint, names, shapes, dtype=dtype, device=device)

    # ---- behaviours -------------------------------------------------------------------------
    # Behaviours that read the same data share the model's outputs: per data source and stage,
    # one forward pass per shifted-type estimator and one JVP per linear-type estimator give the
    # logits z (and ż = J_z e) for every example; each behaviour is then g(z) on its own rows.
    groups: dict[tuple, dict] = {}
    for i, b in enumerate(pipeline.behaviors):
        key = data_key(b)
        if key not in groups:
            if "file" in b.data:
                record(f"eval_data:{b.name}", b.data["file"])
            src = load_eval_source(pipeline, b, i)
            x = src.x.to(device=device, dtype=dtype)
            groups[key] = {"data": EvalData(x=x, y=src.y.to(device), ids=src.ids), "members": []}
        grp = groups[key]
        user_fn = pipeline.resolve(b.callable, f"behaviors[{i}].callable") if b.kind == "callable" else None
        mask = subset_mask(pipeline, b, i, grp["data"].y)
        grp["members"].append((i, b, mask, kind_fn(b, grp["data"].y[mask], user_fn)))

    def timed(name: str, fn):
        t_f = time.perf_counter()
        out = fn()
        form_s[name] = form_s.get(name, 0.0) + time.perf_counter() - t_f
        return out

    by_index: dict[int, dict] = {}
    for gi, grp in enumerate(groups.values()):
        say(f"evaluation data {gi + 1}/{len(groups)}", 0.1 + 0.85 * gi / len(groups))
        z = logits_fn(model, grp["data"].x, buffers, config.eval_chunk)
        any_diff = any(b.differentiable for _, b, _, _ in grp["members"])
        first = grp["members"][0][0]
        with torch.no_grad():
            z_T = call_user(z, f"{pipeline.path}: behaviors[{first}].data (the model's forward pass on it)", theta_T)
        out = {i: {"f_T": g(z_T[mask]), "effects": {}, "truth": {}} for i, b, mask, g in grp["members"]}
        for i, b, mask, g in grp["members"]:
            if not torch.isfinite(out[i]["f_T"]).all():
                raise AuditorError(f"the behaviour is NaN or inf on the final model for "
                                   f"{int((~torch.isfinite(out[i]['f_T'])).sum())} example(s); expected finite values",
                                   where=f"{pipeline.path}: behaviors[{i}]")
        for k, s in enumerate(pipeline.stages):
            e = embeds[k]
            shifts = {"naive": deltas[k], "shifted": e, **{t: es[k] for t, es in tier_embeds.items()}}
            z_cf = {name: timed(name, lambda d=d: _no_grad(z, axpy(theta_T, d, -1.0))) for name, d in shifts.items()}
            duals = {}
            if any_diff or any(b.kind == "accuracy" for _, b, _, _ in grp["members"]):
                duals["linear"] = timed("linear", lambda: torch.func.jvp(z, (theta_T,), (e,)))
            if any_diff:
                duals["midpoint"] = timed("midpoint", lambda: torch.func.jvp(z, (axpy(theta_T, e, -0.5),), (e,)))
            z_truth = _no_grad(z, cf_params[s.name]) if s.name in cf_params else None
            for i, b, mask, g in grp["members"]:
                o = out[i]
                forms = {}
                for name in estimator_names:
                    if name in z_cf:
                        forms[name] = timed(name, lambda zc=z_cf[name]: o["f_T"] - g(zc[mask]))
                    elif b.differentiable:
                        zp, zt = duals[name]
                        forms[name] = timed(name, lambda zp=zp, zt=zt: torch.func.jvp(
                            g, (zp[mask].detach(),), (zt[mask].detach(),))[1].detach())
                    else:
                        forms[name] = None
                o["effects"][s.name] = forms
                o["truth"][s.name] = None if z_truth is None else o["f_T"] - g(z_truth[mask])
                if b.kind == "accuracy":
                    # accuracy has no gradient: judge its linearity by the cross-entropy of the same
                    # examples (the loss accuracy discretises), linear against shifted form
                    o.setdefault("proxy", {})[s.name] = _loss_proxy(z_T[mask], z_cf["shifted"][mask],
                                                                    *duals["linear"], mask, grp["data"].y[mask],
                                                                    b.aggregate)
        for i, b, mask, g in grp["members"]:
            o = out[i]
            o["data"] = EvalData(x=grp["data"].x[mask], y=grp["data"].y[mask], ids=grp["data"].ids[mask.cpu()])
            by_index[i] = o

    behaviours, images = [], {}
    for i, b in enumerate(pipeline.behaviors):
        o = by_index[i]
        data, f_T = o["data"], o["f_T"]
        per_ex = {"ids": data.ids.tolist(), "labels": data.y.cpu().tolist(), "factual": f_T.cpu().tolist(),
                  "effects": {}, "truth": {}}
        effects, truth, fid = {}, {}, {}
        for s in pipeline.stages:
            forms = o["effects"][s.name]
            effects[s.name] = {e: (aggregate(v, b.aggregate) if v is not None else None) for e, v in forms.items()}
            per_ex["effects"][s.name] = {e: (v.cpu().tolist() if v is not None else None) for e, v in forms.items()}
            t = o["truth"][s.name]
            if t is not None:
                truth[s.name] = aggregate(t, b.aggregate)
                per_ex["truth"][s.name] = t.cpu().tolist()
                tv = t.cpu().numpy()
                fid[s.name] = {e: compare(v.cpu().numpy(), tv, effects[s.name][e], truth[s.name])
                               for e, v in forms.items() if v is not None}
            else:
                truth[s.name] = None
                per_ex["truth"][s.name] = None
        primary = {s: effects[s][primary_name] for s in effects}
        total = sum(abs(v) for v in primary.values())
        behaviours.append({
            "name": b.name, "description": b.description, "kind": b.kind, "class": b.cls,
            "aggregate": b.aggregate, "n_examples": len(data.y), "differentiable": b.differentiable,
            "factual": aggregate(f_T, b.aggregate), "effects": effects, "truth": truth,
            "share": {s: (v / total if total > 0 else 0.0) for s, v in primary.items()},
            "fidelity": fid, "per_example": per_ex,
            "diagnostics": _diagnostics(effects, stage_rows, o.get("proxy")),
        })
        if b.image_shape is not None:
            images[b.name] = data.x.detach().cpu().double().reshape(len(data.y), *b.image_shape[-2:]).numpy()

    timing["estimate_s"] += time.perf_counter() - t_est
    timing.update({f"form_{k}_s": v for k, v in form_s.items()})
    say("summarising", 0.97)
    data = {
        "format": 1,
        "auditor_version": __version__,
        "system": pipeline.system,
        "pipeline": {"path": str(pipeline.path), "sha256": inputs[0].sha256},
        "generated_at": generated_at(),
        "device": str(device), "dtype": config.dtype,
        "estimators": estimator_names, "primary_estimator": primary_name, "truth_source": truth_source,
        "tiers": {t: _tier_info(t, config, schedules, behaviours) for t in tier_embeds},
        "stages": stage_rows,
        "behaviors": behaviours,
        "summary": _summary(behaviours, primary_name, judged_by_diagnostics(primary_name, config.curvature)),
        "reviewers": pipeline.reviewers,
        "seeds": pipeline.seeds,
        "versions": {"auditor": __version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": sys.version.split()[0], "platform": platform.platform(terse=True)},
    }
    data = sanitize(data)
    return AuditResult(data=data, pipeline=pipeline, inputs=inputs, images=images, timing=timing)


TRUST_GAP = 0.25  # |linear − shifted| / (|linear| + |shifted|) above this: the effect is not first-order
TRUST_MOTION = 1.0  # later training moved the weights farther than the stage itself did
TRUST_DISPLACEMENT = 0.3  # removing the stage moves the weights by 30% of their norm: not a small perturbation


def exact_tier_direction(later_steps: list[int], n_covectors: int, curvature: str, all_sgd: bool) -> dict:
    """Forward propagation or adjoint sweep for the exact tier: whichever needs fewer curvature products.

    later_steps[k] = number of steps after stage k (k = 0 … K−1; the last is 0). Forward: one
    propagation per stage, Σ_k later_steps[k] products. Adjoint: one sweep per covector (one per
    example of every differentiable behaviour, since the report shows per-example effects) back to
    the end of stage 1, n_covectors · later_steps[0] products; it exists only for the Hessian
    product (the secant product is not linear in δθ) through SGD steps, and it yields the linear
    form ∇f·e_k only. Returns {"direction", "forward_products", "adjoint_products", "reason"}.
    """
    fwd, adj = int(sum(later_steps)), int(n_covectors * (later_steps[0] if later_steps else 0))
    if curvature != "hessian" or not all_sgd:
        why = ("the secant product is not linear in δθ, so it has no adjoint" if curvature != "hessian" else
               "the adjoint covers SGD steps only (the AdamW secant step is not linear)")
        return {"direction": "forward", "forward_products": fwd, "adjoint_products": None, "reason": why}
    if adj < fwd:
        # Not wired into the report: the adjoint gives the linear form only, and the report's tier
        # estimates are in shifted form. Say so rather than silently pay more.
        return {"direction": "forward", "forward_products": fwd, "adjoint_products": adj,
                "reason": "the adjoint would be cheaper, but it gives the linear form only and the report's tier "
                          "estimates use the shifted form; auditor.curvature.adjoint_sweep computes it"}
    return {"direction": "forward", "forward_products": fwd, "adjoint_products": adj,
            "reason": f"cheaper: {fwd} curvature products against {adj} for one adjoint sweep per example "
                      f"({n_covectors} per-example covectors)"}


def _tier_info(tier: str, config: AuditConfig, schedules, behaviours: list[dict]) -> dict:
    if tier == "spectral":
        return {"rank": config.rank, "batches": config.spectral_batches}
    later = [sum(s.n_steps for s in schedules[k + 1:]) for k in range(len(schedules))]
    n_cov = sum(b["n_examples"] for b in behaviours if b["differentiable"])
    info = exact_tier_direction(later, n_cov, config.curvature, all(s.optimizer == "sgd" for s in schedules[1:]))
    return {"curvature": config.curvature,
            "step": ("segment-averaged Hessian: gradient difference ∇L(θ_c) − ∇L(θ_c − δθ)"
                     if config.curvature == "secant" else "Hessian-vector product H(θ_c) δθ"),
            "checkpoints": "nearest recorded at or before each step",
            "mode": f"{info['direction']} (one propagation per stage)", **info}


def _no_grad(fn, arg):
    with torch.no_grad():
        return fn(arg)


def _curvature_embeddings(pipeline, config, model, buffers, names, shapes, schedules, deltas, dmoms, theta_T,
                          dtype, device, say) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """Stage embeddings of the curvature tiers: {tier: [e_k per stage]} and their wall times (s).

    Forward propagation, one per stage (the per-example fidelity needs every example's effect,
    for which the adjoint would cost one sweep per example)."""
    from . import curvature
    from .checkpoints import load_optimizer_state
    from .training import make_batch_loss, make_checkpoint_at

    batch_loss = make_batch_loss(pipeline, model, buffers, dtype=dtype, device=device)
    ck = make_checkpoint_at(pipeline, schedules, names, shapes, dtype=dtype, device=device)
    for st, sch in list(zip(pipeline.stages, schedules))[1:]:  # the first stage is never a "later" stage
        if sch.batches is None:
            raise AuditorError("the curvature tier needs the batch of every step after the first stage; "
                               "expected a 'batch' column", where=str(st.log))
    stages = pipeline.stages
    state_cache: dict = {}

    def state_entering(idx: int):
        """Optimizer state entering stage idx (None: fresh)."""
        if stages[idx].reset or idx == 0 or stages[idx - 1].optimizer_state is None:
            return None
        if idx not in state_cache:
            st = load_optimizer_state(stages[idx - 1].optimizer_state)
            state_cache[idx] = {n: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v)
                                for n, v in st.items()}
        return state_cache[idx]

    index = {s.name: i for i, s in enumerate(stages)}
    opt_at = lambda name: state_entering(index[name])  # noqa: E731
    K = len(stages)
    out: dict[str, list[dict]] = {}
    times: dict[str, float] = {}
    if "exact" in config.tiers:
        t0 = time.perf_counter()
        es = []
        for k in range(K):
            later = schedules[k + 1:]
            say(f"exact tier: propagating {stages[k].name} through {sum(s.n_steps for s in later)} later steps",
                0.05 + 0.05 * k / K)
            if not later:
                es.append(dict(deltas[k]))
                continue
            es.append(curvature.propagate_exact(deltas[k], dmoms[k], later, batch_loss, ck,
                                                optimizer_state_at_stage_start=opt_at,
                                                cf_optimizer_state=state_entering(k), curvature=config.curvature))
        out["exact"] = es
        times["exact_s"] = time.perf_counter() - t0
    if "spectral" in config.tiers:
        t0 = time.perf_counter()
        say(f"spectral tier: top-{config.rank} Hessian eigen-directions per segment", 0.1)
        counter = curvature.HVPCounter()
        segs = curvature.spectral_segments(schedules[1:], batch_loss, ck, theta_T, ck.recorded_steps(),
                                           rank=config.rank, n_batches=config.spectral_batches,
                                           optimizer_state_at_stage_start=opt_at, counter=counter)
        es = []
        for k in range(K):
            later = schedules[k + 1:]
            es.append(dict(deltas[k]) if not later else
                      curvature.propagate_spectral(deltas[k], dmoms[k], later, segments=segs))
        out["spectral"] = es
        times["spectral_s"] = time.perf_counter() - t0
        times["spectral_hvp"] = float(counter.hvp)
        times["spectral_segments"] = float(len(segs))
    return out, times


def _loss_proxy(z_T: torch.Tensor, z_shifted: torch.Tensor, z_lin_at: torch.Tensor, z_lin_dot: torch.Tensor,
                mask: torch.Tensor, y: torch.Tensor, how: str) -> tuple[float, float]:
    """(linear, shifted) AA estimates of the cross-entropy on a behaviour's own examples: the
    stand-in for a non-differentiable behaviour's linear–shifted gap. Logits [n, C]; z_lin_* are
    the group's (z, J_z e) at θ_T, masked here."""
    loss = lambda zz: F.cross_entropy(zz, y, reduction="none")  # noqa: E731
    lin = torch.func.jvp(loss, (z_lin_at[mask].detach(),), (z_lin_dot[mask].detach(),))[1]
    return aggregate(lin, how), aggregate(loss(z_T) - loss(z_shifted), how)


def _diagnostics(effects: dict, stage_rows: list[dict], proxy: dict | None = None) -> dict:
    """Linearization diagnostics per stage, computed without retraining.

    linear_shifted_gap: |τ̂ − τ̃| / (|τ̂| + |τ̃|) on the aggregate (0 when f is linear along e_k);
    relative_displacement: ‖e_k‖ / ‖θ_T‖ (the estimates evaluate f at θ_T − e_k: a first-order
    account of the stage is only credible while that is a small perturbation);
    later_motion: ‖θ_T − θ_{b_k}‖ / ‖Δ_k‖, how far later training moved the weights relative to the
    stage's own displacement — AA ignores how later gradients respond to the stage, so large
    later motion means large unmodelled curvature effects.

    ``trusted`` is the verdict on the headline (shifted) estimate; ``trusted_linear`` on the linear
    and midpoint forms, which also need f to be close to linear along e_k. The last stage has no
    later steps, so its embedding is exact (α = 1, β = 0) and its shifted estimate is exact.
    ``proxy`` {stage: (linear, shifted)}: for a behaviour without a gradient (accuracy), the gap is
    taken on the cross-entropy of the same examples (``gap_source`` says so).
    """
    out = {}
    last = stage_rows[-1]["name"]
    for row in stage_rows:
        e = effects[row["name"]]
        lin, sh = e.get("linear"), e["shifted"]
        source = "the behaviour"
        if lin is None and proxy and row["name"] in proxy:
            lin, sh = proxy[row["name"]]
            source = "cross-entropy of the same examples"
        gap = abs(lin - sh) / (abs(lin) + abs(sh)) if lin is not None and (abs(lin) + abs(sh)) > 0 else None
        motion = row["later_motion_norm"] / row["delta_norm"] if row["delta_norm"] > 0 else 0.0
        disp = row["embedding_norm"] / row["weight_norm"] if row["weight_norm"] > 0 else 0.0
        exact = row["name"] == last
        reasons = []
        gap_bad = gap is not None and gap > TRUST_GAP
        if gap_bad:
            on = "" if source == "the behaviour" else f" on the {source}"
            reasons.append(f"linear and shifted forms differ by {gap:.0%}{on} (nonlinear along the embedding)")
        if not exact and disp > TRUST_DISPLACEMENT:
            reasons.append(f"removing the stage moves the weights by {disp:.0%} of their norm "
                           "(far from the first-order regime)")
        if not exact and motion > TRUST_MOTION:
            reasons.append(f"later stages moved the weights {motion:.1f}× as far as this stage did "
                           "(curvature effects unmodelled)")
        headline_ok = exact or not reasons
        if exact:
            reasons.insert(0, "last stage: the shifted estimate is exact")
        out[row["name"]] = {"linear_shifted_gap": gap, "gap_source": source if gap is not None else None,
                            "relative_displacement": disp, "later_motion": motion,
                            "exact": exact, "trusted": headline_ok, "trusted_linear": headline_ok and not gap_bad,
                            "reason": "; ".join(reasons)}
    return out


def _extreme(b: dict, sign: int, primary: str) -> dict | None:
    """The stage that raised (sign=+1) or lowered (sign=−1) behaviour b most, by the primary estimate,
    with whether the retraining truth names the same stage in the same direction."""
    eff = {s: v[primary] for s, v in b["effects"].items()}
    cands = [s for s in eff if sign * eff[s] > 0]
    if not cands:
        return None
    stage = max(cands, key=lambda s: sign * eff[s])
    agrees = None
    if all(v is not None for v in b["truth"].values()):
        t_stage = max(b["truth"], key=lambda s: sign * b["truth"][s])
        agrees = bool(t_stage == stage and sign * b["truth"][stage] > 0)
    return {"stage": stage, "effect": eff[stage], "share": b["share"][stage], "truth": b["truth"].get(stage),
            "truth_same_stage": agrees}


def _summary(behaviours: list[dict], primary: str, judged: bool = True) -> list[dict]:
    """Per behaviour: the most accountable stage (largest |primary effect|), and the stages that
    raised and lowered it most."""
    out = []
    for b in behaviours:
        eff = {s: v[primary] for s, v in b["effects"].items()}
        stage = max(eff, key=lambda s: abs(eff[s]))
        truth_top = None
        if all(v is not None for v in b["truth"].values()):
            truth_top = max(b["truth"], key=lambda s: abs(b["truth"][s]))
        out.append({"behavior": b["name"], "stage": stage, "direction": "raised" if eff[stage] > 0 else "lowered",
                    "effect": eff[stage], "share": b["share"][stage], "truth": b["truth"].get(stage),
                    "truth_same_stage": None if truth_top is None else
                    bool(truth_top == stage and np.sign(b["truth"][stage]) == np.sign(eff[stage])),
                    # the diagnostics judge first-order estimates (see judged_by_diagnostics)
                    "trusted": b["diagnostics"][stage]["trusted"] if judged else None,
                    "raised_most": _extreme(b, +1, primary), "lowered_most": _extreme(b, -1, primary)})
    return out
