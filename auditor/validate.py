"""Deep validation of a pipeline without auditing it: every file, log, checkpoint and dataset."""

from __future__ import annotations

from pathlib import Path

import torch

from .behaviors import check_classes, load_eval_data
from .checkpoints import load_momentum, load_params
from .errors import AuditorError
from .pipeline import Pipeline, call_user, load_pipeline


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
    theta = load_params(p.stages[-1].end_checkpoint, names, shapes, **kw)
    model = model.double()
    n_examples = 0
    for i, b in enumerate(p.behaviors):
        data = load_eval_data(p, b, i)
        n_examples += len(data.y)
        with torch.no_grad():
            z = call_user(torch.func.functional_call, f"{p.path}: behaviors[{i}].data (the model's forward pass on it)",
                          model, theta, (data.x[:1].double(),))
        check_classes(b, data.y, z.shape[-1])
    if p.training and "data" in p.training:
        _check_batches(p, schedules)
    steps = schedules[-1].end_step
    return (f"{len(p.stages)} stages, {steps} steps, {len(p.behaviors)} behaviours "
            f"({n_examples} evaluation examples), {len(p.policy)} release gate{'' if len(p.policy) == 1 else 's'}")


def _check_batches(p: Pipeline, schedules) -> None:
    """Every logged batch id must be an id of the stage's training data (training.data)."""
    fn = p.resolve(p.training["data"], "training.data")
    for s, sch in zip(p.stages, schedules):
        if sch.batches is None:
            continue
        d = call_user(fn, f"{p.path}: training.data", s.name)
        ids = set(torch.as_tensor(d["ids"]).tolist()) if "ids" in d else set(range(len(d["y"])))
        for t, batch in enumerate(sch.batches):
            missing = [i for i in batch if i not in ids]
            if missing:
                raise AuditorError(f"column 'batch' at step {sch.first_step + t} names example {missing[0]}, which "
                                   f"is not among the ids of {p.training['data']}({s.name!r})", where=str(s.log))
