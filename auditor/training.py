"""The training side of a pipeline, for the curvature tier: minibatch losses and recorded checkpoints.

``batch_loss(params, stage, ids)`` is the loss L_t(θ) of a logged step (mean over its batch),
built from the YAML's ``training.data`` and ``training.loss``; ``checkpoint_at(step)`` returns
the parameters of the nearest recorded checkpoint at or before ``step``.
"""

from __future__ import annotations

import bisect
from typing import Callable

import torch
import torch.nn.functional as F

from .checkpoints import load_params
from .errors import AuditorError
from .pipeline import Pipeline, call_user
from .steplog import StageSchedule


def make_batch_loss(pipeline: Pipeline, model: torch.nn.Module, buffers: dict, *, dtype, device) -> Callable:
    tr = pipeline.training or {}
    if "data" not in tr:
        raise AuditorError("the curvature tier needs the training batches; expected training.data: module:function",
                           where=f"{pipeline.path}: training.data")
    data_fn = pipeline.resolve(tr["data"], "training.data")
    loss_spec = tr.get("loss", "cross_entropy")
    loss_fn = F.cross_entropy if loss_spec == "cross_entropy" else pipeline.resolve(loss_spec, "training.loss")
    cache: dict[str, tuple[torch.Tensor, torch.Tensor, dict[int, int]]] = {}

    def stage_tensors(stage: str):
        if stage not in cache:
            d = call_user(data_fn, f"{pipeline.path}: training.data", stage)
            if not isinstance(d, dict) or not {"x", "y"} <= set(d):
                raise AuditorError(f"{tr['data']}({stage!r}) returned no dict with 'x' and 'y'",
                                   where=f"{pipeline.path}: training.data")
            x = torch.as_tensor(d["x"]).to(device=device, dtype=dtype)
            ids = torch.as_tensor(d["ids"]).tolist() if "ids" in d else list(range(len(d["y"])))
            cache[stage] = (x, torch.as_tensor(d["y"]).long().to(device), {int(i): r for r, i in enumerate(ids)})
        return cache[stage]

    def batch_loss(params: dict[str, torch.Tensor], stage: str, batch_ids: list[int]) -> torch.Tensor:
        x, y, row = stage_tensors(stage)
        try:
            idx = torch.tensor([row[int(i)] for i in batch_ids], device=x.device)
        except KeyError as exc:
            raise AuditorError(f"batch id {exc.args[0]} of stage {stage!r} is not among the ids returned by "
                               f"{tr['data']}", where=f"{pipeline.path}: training.data") from None
        logits = torch.func.functional_call(model, {**buffers, **params}, (x[idx],))
        loss = call_user(loss_fn, f"{pipeline.path}: training.loss", logits, y[idx])
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise AuditorError(f"the training loss returned {getattr(loss, 'shape', type(loss).__name__)}; expected "
                               "a scalar tensor (the mean over the batch)", where=f"{pipeline.path}: training.loss")
        return loss

    return batch_loss


def make_checkpoint_at(pipeline: Pipeline, schedules: list[StageSchedule], names: list[str], shapes: dict, *,
                       dtype, device) -> Callable:
    """Nearest recorded checkpoint at or before a global step (stage starts, intermediates, ends);
    ``schedules`` are the pipeline's validated step logs (they give each stage's step range)."""
    return _CheckpointIndex(pipeline, schedules, names, shapes, dtype, device)


class _CheckpointIndex:
    def __init__(self, pipeline: Pipeline, schedules: list[StageSchedule], names, shapes, dtype, device):
        pts: dict[int, object] = {}
        for s, sch in zip(pipeline.stages, schedules):
            pts[sch.first_step] = s.start_checkpoint  # a stage's own start wins over the previous end
            for st, path in s.checkpoints:
                pts.setdefault(st, path)
            pts.setdefault(sch.end_step, s.end_checkpoint)
        self.steps = sorted(pts)
        self.paths = pts
        self.kw = dict(names=names, shapes=shapes, dtype=dtype, device=device)
        self.cache: dict[int, dict] = {}

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        i = bisect.bisect_right(self.steps, step) - 1
        at = self.steps[max(i, 0)]
        if at not in self.cache:
            kw = self.kw
            self.cache[at] = load_params(self.paths[at], kw["names"], kw["shapes"], dtype=kw["dtype"],
                                         device=kw["device"])
        return self.cache[at]

    def recorded_steps(self) -> list[int]:
        return list(self.steps)
