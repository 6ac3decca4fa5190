"""What lifts the first stage? Variants of the exact tier on the digits sample's first stage.

    python benchmarks/first_stage.py          # about 1 minute on 2 cores

Removing the digits sample's pretraining moves the weights by two thirds of their norm, so the
first-order picture (later training linearised around the factual trajectory) is at its worst.
This script propagates the first stage's boundary difference through the 300 later steps with

* curvature product: ``hessian`` (HVP at the checkpoint, ESTIMATORS.md §3.2 as written),
  ``gauss-newton`` (the PSD Gauss–Newton part Jᵀ ∇²_z ℓ J of that Hessian, cross-entropy), or
  ``secant`` (the Hessian averaged along the change: ∇L(θ_c) − ∇L(θ_c − δθ), auditor's default);
* checkpoint spacing: stage boundaries only, every 25 steps (what the sample records), every 5,
  every step (the factual trajectory, replayed with the sample's own training code);

and prints per-example Pearson / Spearman with retraining on the clean test loss, in the shifted
form f(θ_T) − f(θ_T − e) that the report uses and in the linear form ∇f(θ_T)·e, beside the AA
and naive estimates, and the cosine between the propagated change e and the true change
θ_T − θ_T^(−1) of the final weights. With a checkpoint at every step the secant product computes every
counterfactual gradient exactly, so that row must reproduce retraining (a check of the script).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "samples" / "digits"))

from auditor import load_pipeline  # noqa: E402
from auditor import curvature as cv  # noqa: E402
from auditor.checkpoints import load_momentum, load_params, load_tensors  # noqa: E402
from auditor.estimators import embedding  # noqa: E402
from auditor.propagation import propagation_coefficients  # noqa: E402
from auditor.training import make_batch_loss  # noqa: E402

DT = torch.float64


def main() -> int:
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    pipe = load_pipeline(ROOT / "samples" / "digits" / "pipeline.yaml")
    pipe.ensure_artifacts(None)
    import digits_pipeline as dp

    model = pipe.build_model().to(DT)
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    sched = pipe.load_schedules(names)
    st0 = pipe.stages[0]

    def P(path):
        return load_params(path, names, shapes, dtype=DT, device="cpu")

    # factual trajectory of the later stages, every step, from the sample's own training code
    traj: dict[int, dict] = {}
    for j, st in enumerate(pipe.stages[1:], start=1):
        start = load_tensors(st.start_checkpoint)
        state = None if st.reset else load_tensors(pipe.stages[j - 1].optimizer_state)
        traj[sched[j].first_step] = {k: v.to(DT) for k, v in start.items()}
        dp._run_stage(model.float(), st.name, start, state, st.log,
                      on_step=lambda t, net: traj.__setitem__(t, {k: v.detach().to(DT).clone()
                                                                  for k, v in net.state_dict().items()}))
    model = model.to(DT)
    boundaries = sorted({s.first_step for s in sched[1:]})

    def checkpoints(every: int | None):
        keep = sorted(set(boundaries) | ({t for t in traj if every and (t - boundaries[0]) % every == 0}))

        def at(t: int):
            return traj[max(s for s in keep if s <= t)]
        return at

    batch_loss = make_batch_loss(pipe, model, {}, dtype=DT, device="cpu")
    data = {s.name: dp.stage_data(s.name) for s in pipe.stages}
    rows = {n: {int(i): r for r, i in enumerate(d["ids"].tolist())} for n, d in data.items()}

    def gauss_newton(batch_loss_, params, stage, ids, vector, *, with_grad=False, counter=None):
        """Jᵀ (∇²_z ℓ) J v for the mean cross-entropy of the batch (z = logits)."""
        idx = torch.tensor([rows[stage][int(i)] for i in ids])
        x = data[stage]["x"][idx].to(DT)
        keys = list(vector)

        def z(th):
            return torch.func.functional_call(model, {**params, **th}, (x,))
        prim = {k: params[k] for k in keys}
        logits, jv = torch.func.jvp(z, (prim,), ({k: vector[k] for k in keys},))
        p = torch.softmax(logits, -1)
        hz = p * jv - p * (p * jv).sum(-1, keepdim=True)
        _, vjp = torch.func.vjp(z, prim)
        return vjp(hz / len(ids))[0], None

    delta = {n: P(st0.end_checkpoint)[n] - P(st0.start_checkpoint)[n] for n in names}
    dm = load_momentum(st0.optimizer_state, names, shapes, dtype=DT, device="cpu")  # next stage carries
    theta_T = P(pipe.stages[-1].end_checkpoint)
    test = load_tensors(pipe.behaviors[0].data["file"])
    x, y = test["x"].to(DT).reshape(len(test["y"]), -1), test["y"].long()

    def loss(th):
        return F.cross_entropy(torch.func.functional_call(model, th, (x,)), y, reduction="none")

    l_T = loss(theta_T)
    theta_cf = P(st0.counterfactual_checkpoint)
    truth = (l_T - loss(theta_cf)).numpy()
    true_change = torch.cat([(theta_T[k] - theta_cf[k]).reshape(-1) for k in names])

    def scores(e):
        shifted = (l_T - loss({k: theta_T[k] - e[k] for k in theta_T})).numpy()
        lin = torch.func.jvp(loss, (theta_T,), (e,))[1].numpy()
        flat = torch.cat([e[k].reshape(-1) for k in names])
        cos = float(flat @ true_change / (flat.norm() * true_change.norm()))
        return [f(v, truth)[0] for v in (shifted, lin) for f in (pearsonr, spearmanr)] + [cos]

    print("# First stage of the digits sample: per-example clean test loss (n = %d) against retraining\n" % len(y))
    print("| estimator | curvature | checkpoints | Pearson (shifted) | Spearman (shifted) | Pearson (linear) "
          "| Spearman (linear) | cos(e, true change) | time (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    aa = embedding(delta, dm, propagation_coefficients(sched, 0, names))
    for name, e in (("naive", delta), ("AA", aa)):
        print(f"| {name} | none | — | " + " | ".join(f"{v:.3f}" for v in scores(e)) + " | — |")
    steps = {None: "stage boundaries", 25: "every 25 steps (recorded)", 5: "every 5 steps", 1: "every step"}
    orig = cv.hessian_vector_product
    for curv in ("hessian", "gauss-newton", "secant"):
        for every, label in steps.items():
            if curv == "gauss-newton":
                cv.hessian_vector_product = gauss_newton
            t0 = time.perf_counter()
            try:
                e = cv.propagate_exact(delta, dm, sched[1:], batch_loss, checkpoints(every),
                                       curvature="secant" if curv == "secant" else "hessian")
            finally:
                cv.hessian_vector_product = orig
            secs = time.perf_counter() - t0
            print(f"| exact tier | {curv} | {label} | " + " | ".join(f"{v:.3f}" for v in scores(e)) + f" | {secs:.2f} |")
    print(f"\nTotal: {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
