"""Fidelity benchmark: every estimator against retraining on both bundled samples.

    python benchmarks/fidelity.py            # ~1 minute on 2 cores once the samples are built;
                                             # builds missing sample artifacts first (~1 minute)

Prints, per sample, a stage × estimator table on the sample's per-example test loss: Pearson,
Spearman and sign agreement with the retraining truth, the mean Pearson over all differentiable
behaviours, the estimator's wall time (all stages and behaviours) and its speed-up over
retraining (the time to replay every counterfactual). Estimators: naive; AA in linear, midpoint
and shifted form; the exact tier with its default secant curvature (``exact``) and with
``--curvature hessian`` (``exact-hessian``); spectral. Then the cost of AA against retraining
and against its floor (bare JVPs), the spectral tier's cost at two stage lengths, the share of
the AA → exact gap in Pearson that the spectral tier closes on the middle stage of the digits
pipeline, and the first stage's Spearman figures (benchmarks/first_stage.py digs further).

All timings are from one run on this machine with torch on one thread (the samples replay on
one thread too); the AA forms and the exact tier are run once to warm up before they are timed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from auditor import AuditConfig, estimate, load_pipeline  # noqa: E402

SAMPLES = {"digits": ("samples/digits/pipeline.yaml", "clean_test_loss"),
           "breast_cancer": ("samples/breast_cancer/pipeline.yaml", "test_loss")}
ORDER = ("naive", "linear", "midpoint", "shifted", "exact", "exact-hessian", "spectral")
TIERS = ("exact", "spectral")


def estimator_seconds(timing: dict, name: str) -> float:
    """Wall time of one estimator for all stages and behaviours (its embedding + its form)."""
    form = timing.get(f"form_{name}_s", 0.0)
    if name in ("linear", "midpoint", "shifted"):
        return timing["aa_embedding_s"] + form
    if name == "exact-hessian":
        return timing["exact_hessian_s"] + timing.get("form_exact_hessian_s", 0.0)
    if name in TIERS:
        return timing[f"{name}_s"] + form
    return form  # naive: the checkpoint difference needs no propagation


def fmt(x, spec=".3f"):
    return "  n/a" if x is None else format(x, spec)


def run_sample(name: str, path: str, loss_behaviour: str, rank: int) -> dict:
    pipeline = load_pipeline(ROOT / path)
    pipeline.ensure_artifacts(lambda msg, frac: print(f"  [{name} build {frac:4.0%}] {msg}", end="\r"))
    # warm-up: imports, first JVPs, first gradients and HVPs (their first calls pay set-up costs)
    estimate(pipeline, AuditConfig(build=False, tiers=("exact",)))
    estimate(pipeline, AuditConfig(build=False, tiers=("exact",), curvature="hessian"))
    t0 = time.perf_counter()
    res = estimate(pipeline, AuditConfig(build=False, retrain=True, tiers=TIERS, rank=rank))
    total = time.perf_counter() - t0
    data, timing = res.to_dict(), res.timing
    # the exact tier once more with the Hessian-vector product at the checkpoint (--curvature hessian)
    hes = estimate(pipeline, AuditConfig(build=False, retrain=True, tiers=("exact",), curvature="hessian"))
    timing["exact_hessian_s"] = hes.timing["exact_s"]
    timing["form_exact_hessian_s"] = hes.timing.get("form_exact_s", 0.0)
    hes_b = {b["name"]: b for b in hes.to_dict()["behaviors"]}
    for bb in data["behaviors"]:
        for s, f in hes_b[bb["name"]]["fidelity"].items():
            if "exact" in f:
                bb["fidelity"][s]["exact-hessian"] = f["exact"]
    retrain_s = timing["retrain_s"]
    behaviours = {b["name"]: b for b in data["behaviors"]}
    b = behaviours[loss_behaviour]
    print(f"\n## {name}: {len(data['stages'])} stages, per-example {loss_behaviour} "
          f"(n = {b['n_examples']}); retraining every counterfactual: {retrain_s:.2f} s; run: {total:.1f} s\n")
    print("| stage | estimator | Pearson | Spearman | sign agr. | mean Pearson (all behaviours) | rel. err (agg.) "
          "| time (s) | speed-up vs retraining |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = {}
    for st in data["stages"]:
        s = st["name"]
        for est in ORDER:
            fid = b["fidelity"].get(s, {}).get(est)
            if fid is None:
                continue
            others = [bb["fidelity"][s][est]["pearson"] for bb in behaviours.values()
                      if bb["differentiable"] and est in bb["fidelity"].get(s, {})
                      and bb["fidelity"][s][est]["pearson"] is not None]
            secs = estimator_seconds(timing, est)
            rows[(s, est)] = fid
            print(f"| {s} | {est} | {fmt(fid['pearson'])} | {fmt(fid['spearman'])} | {fmt(fid['sign_agreement'], '.2f')} "
                  f"| {fmt(float(np.mean(others)) if others else None)} | {fmt(fid['rel_error'], '.2f')} "
                  f"| {secs:.3f} | {retrain_s / secs if secs > 0 else float('inf'):.3g}× |")
    aa_shifted = estimator_seconds(timing, "shifted")
    jvp_s = timing.get("form_linear_s", 0.0) + timing.get("form_midpoint_s", 0.0)
    aa = aa_shifted + jvp_s
    floor = jvp_floor(pipeline, len(data["stages"]))
    print(f"\nCost of AA for all stages and behaviours: the estimate (shifted form, the report's headline AA "
          f"estimate) {aa_shifted:.3f} s = **1/{retrain_s / aa_shifted:.0f} of retraining**; with the linear and "
          f"midpoint forms too {aa:.3f} s = 1/{retrain_s / aa:.0f}. Those two forms need {floor['n_jvp']} JVPs "
          f"(one per form, stage and data source) over {floor['examples']} examples each time: "
          f"{floor['n_jvp'] * floor['examples']} example-JVPs against retraining's {floor['train_examples']} "
          f"example-gradients; bare torch.func.jvp calls of the same count take {floor['seconds']:.3f} s "
          f"= 1/{retrain_s / floor['seconds']:.0f} of retraining (ours / floor = {jvp_s / floor['seconds']:.2f}).")
    print(f"Spectral tier: {int(timing['spectral_hvp'])} HVPs over {int(timing['spectral_segments'])} segments.")
    return {"rows": rows, "stages": [st["name"] for st in data["stages"]]}


def jvp_floor(pipeline, n_stages: int) -> dict:
    """The floor of the linear and midpoint forms: bare ``torch.func.jvp`` of the model's logits,
    one per form, stage and distinct evaluation source, at θ_T along a random direction (float64,
    one thread, best of 5); and the work retraining does (example-gradients over all counterfactual replays)."""
    from auditor.behaviors import data_key, load_eval_source, logits_fn
    from auditor.checkpoints import load_params

    model = pipeline.build_model().double()
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    theta = load_params(pipeline.stages[-1].end_checkpoint, names, shapes, dtype=torch.float64, device="cpu")
    gen = torch.Generator().manual_seed(0)
    e = {n: torch.randn(v.shape, generator=gen, dtype=torch.float64) for n, v in theta.items()}
    sources, seen = [], set()
    for i, b in enumerate(pipeline.behaviors):
        if b.differentiable and data_key(b) not in seen:
            seen.add(data_key(b))
            sources.append(load_eval_source(pipeline, b, i).x.double())
    zs = [logits_fn(model, x, {}, 4096) for x in sources]
    best = float("inf")
    for _ in range(5):  # best of 5: the first calls of torch.func.jvp pay one-off set-up costs
        t0 = time.perf_counter()
        for _ in range(2 * n_stages):
            for z in zs:
                torch.func.jvp(z, (theta,), (e,))
        best = min(best, time.perf_counter() - t0)
    sched = pipeline.load_schedules(names)
    train = sum(sum(len(b) for b in s.batches) for k in range(len(sched)) for s in sched[k + 1:])
    return {"seconds": best, "n_jvp": 2 * n_stages * len(zs),
            "examples": sum(len(x) for x in sources) // max(len(zs), 1), "train_examples": train}


def spectral_length_check(rank: int) -> None:
    """Spectral vs exact cost when the later stages run for L and 2L steps (segments = stages, so
    the number of segments is fixed and only their length changes). The exact tier runs with
    Hessian-vector products here (--curvature hessian), so that both columns count HVPs."""
    print("\n## Spectral-tier cost against the length of the later stages (digits, segments = stages)\n")
    print("| later-stage length | exact tier: HVPs | exact tier: s | spectral: HVPs | spectral: s |")
    print("|---|---|---|---|---|")
    src = ROOT / "samples" / "digits"
    sys.path.insert(0, str(src))
    import digits_pipeline  # noqa: E402

    for scale in (0.5, 1.0):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            shutil.copy(src / "digits_pipeline.py", tmp / "digits_pipeline.py")
            digits_pipeline.build_artifacts(tmp, None, steps_scale=scale)
            doc = yaml.safe_load((src / "pipeline.yaml").read_text())
            doc.pop("build", None)
            for st in doc["stages"]:
                st.pop("checkpoints", None)
                st.pop("counterfactual_checkpoint", None)
            (tmp / "pipeline.yaml").write_text(yaml.safe_dump(doc))
            p = load_pipeline(tmp / "pipeline.yaml")
            sched = p.load_schedules()
            later = sum(s.n_steps for s in sched[1:])
            res = estimate(p, AuditConfig(build=False, tiers=("exact", "spectral"), curvature="hessian", rank=rank))
            exact_hvp = sum(sum(s.n_steps for s in sched[k + 1:]) for k in range(len(sched)))
            print(f"| {later} steps after stage 1 | {exact_hvp} | {res.timing['exact_s']:.2f} "
                  f"| {int(res.timing['spectral_hvp'])} | {res.timing['spectral_s']:.2f} |")
    sys.path.remove(str(src))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=20)
    ap.add_argument("--skip-length-check", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    print(f"# auditor fidelity benchmark (torch {torch.__version__}, 1 thread, float64, spectral rank {args.rank})")
    results = {name: run_sample(name, path, beh, args.rank) for name, (path, beh) in SAMPLES.items()}
    d = results["digits"]["rows"]
    mid = results["digits"]["stages"][1]
    aa, ex, sp = (d[(mid, e)]["pearson"] for e in ("shifted", "exact", "spectral"))
    if ex is not None and aa is not None and sp is not None and ex != aa:
        print(f"\nDigits, middle stage ({mid}): spectral closes {(sp - aa) / (ex - aa):.0%} of the Pearson gap "
              f"between AA-shifted ({aa:.3f}) and the exact tier ({ex:.3f}); spectral: {sp:.3f}.")
        exh = d[(mid, "exact-hessian")]["pearson"]
        if exh is not None and exh != aa:
            print(f"Against the exact tier with --curvature hessian ({exh:.3f}) it closes {(sp - aa) / (exh - aa):.0%}.")
    first = results["digits"]["stages"][0]
    sp_first = {e: d[(first, e)]["spearman"] for e in ORDER if (first, e) in d}
    best_other = max((e for e in ("naive", "linear", "midpoint", "shifted")), key=lambda e: sp_first[e])
    print(f"Digits, first stage ({first}), Spearman: exact tier {sp_first['exact']:.3f} against the best of AA and "
          f"naive, {best_other} {sp_first[best_other]:.3f}; exact tier with --curvature hessian "
          f"{sp_first['exact-hessian']:.3f}.")
    if not args.skip_length_check:
        spectral_length_check(args.rank)
    print(f"\nTotal benchmark time: {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
