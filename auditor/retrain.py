"""Ground truth by retraining (ESTIMATORS.md §2), through the YAML's ``training.replay`` entry point.

For each stage k the counterfactual run starts from stage k's start checkpoint and the optimizer
state entering stage k (fresh when stage k resets, else the previous stage's end state), skips
stage k's steps, and replays every later stage with its recorded batches and hyperparameters.
A later stage whose start checkpoint differs from the previous stage's end (a new head) gets the
same jump in the counterfactual: θ_cf ← θ_cf + (start_j − end_{j−1}).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from .checkpoints import load_optimizer_state, load_tensors
from .errors import AuditorError
from .pipeline import Pipeline, call_user

Progress = Callable[[str, float], None]


def replay_fn(pipeline: Pipeline) -> Callable:
    if not pipeline.training or "replay" not in pipeline.training:
        raise AuditorError("retraining needs a replay entry point; expected training.replay: module:function",
                           where=f"{pipeline.path}: training.replay")
    return pipeline.resolve(pipeline.training["replay"], "training.replay")


def _float_keys(sd: dict) -> list[str]:
    return [k for k, v in sd.items() if v.is_floating_point()]


def retrain_counterfactuals(pipeline: Pipeline, model: torch.nn.Module, progress: Progress | None = None,
                            stages: list[int] | None = None) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
    """θ_T^(−k) (a state dict) for each requested stage k, and the wall time spent replaying (s)."""
    replay = replay_fn(pipeline)
    st = pipeline.stages
    K = len(st)
    todo = list(range(K)) if stages is None else stages
    starts = {k: load_tensors(st[k].start_checkpoint) for k in range(K)}
    ends = {k: load_tensors(st[k].end_checkpoint) for k in range(K - 1)}
    total = sum(K - 1 - k for k in todo) or 1
    done = 0
    out: dict[str, dict[str, torch.Tensor]] = {}
    t0 = time.perf_counter()
    for k in todo:
        theta = {n: v.clone() for n, v in starts[k].items()}
        if st[k].reset or k == 0:
            opt = None
        else:
            prev = st[k - 1].optimizer_state
            opt = load_optimizer_state(prev) if prev is not None else None
        for j in range(k + 1, K):
            if progress:
                progress(f"retraining without {st[k].name}: replaying {st[j].name}", done / total)
            for n in _float_keys(starts[j]):
                jump = starts[j][n] - ends[j - 1][n]
                if torch.any(jump != 0):
                    theta[n] = theta[n] + jump
            if st[j].reset:
                opt = None
            result = call_user(replay, f"{pipeline.path}: training.replay", model, st[j].name, theta, opt)
            if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], dict)):
                raise AuditorError(f"{pipeline.training['replay']} returned {type(result).__name__}; expected "
                                   "(params, optimizer_state)", where=f"{pipeline.path}: training.replay")
            theta, opt = result
            bad = sorted(n for n, v in theta.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
                         and not torch.isfinite(v).all())
            if bad:
                raise AuditorError(f"replaying stage {st[j].name!r} returned non-finite parameters ({bad[0]}); "
                                   "expected finite weights", where=f"{pipeline.path}: training.replay")
            done += 1
        out[st[k].name] = {n: v.detach().clone() for n, v in theta.items()}
    return out, time.perf_counter() - t0
