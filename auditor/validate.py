"""Deep validation of a pipeline without auditing it: every file, log, checkpoint and dataset."""

from __future__ import annotations

from pathlib import Path

import torch

from .behaviors import load_eval_data
from .checkpoints import load_momentum, load_params
from .pipeline import Pipeline, load_pipeline


def validate_pipeline(path: str | Path | Pipeline) -> str:
    """Raise AuditorError on the first problem; return a one-line summary otherwise."""
    p = path if isinstance(path, Pipeline) else load_pipeline(path)
    p.check_files()
    model = p.build_model()
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: q.shape for n, q in model.named_parameters()}
    schedules = p.load_schedules(names)
    kw = dict(dtype=torch.float64, device=torch.device("cpu"))
    for s in p.stages:
        for ck in [s.start_checkpoint, s.end_checkpoint, *(c for _, c in s.checkpoints),
                   *([s.counterfactual_checkpoint] if s.counterfactual_checkpoint else [])]:
            load_params(ck, names, shapes, **kw)
        if s.optimizer == "sgd" and s.optimizer_state is not None:
            load_momentum(s.optimizer_state, names, shapes, **kw)
    n_examples = sum(len(load_eval_data(p, b, i).y) for i, b in enumerate(p.behaviors))
    steps = schedules[-1].end_step
    return (f"{len(p.stages)} stages, {steps} steps, {len(p.behaviors)} behaviours "
            f"({n_examples} evaluation examples), {len(p.policy)} release gates")
