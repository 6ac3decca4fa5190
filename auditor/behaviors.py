"""Behaviours: per-example scalar functions f_i(θ) of the parameters, for all examples at once.

``behavior_fn(model, behavior, data, buffers)`` returns ``f(params) -> Tensor[N]`` built on
``torch.func.functional_call``, so it composes with ``torch.func.jvp``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .checkpoints import load_tensors
from .errors import AuditorError
from .pipeline import Behavior, Pipeline


@dataclass
class EvalData:
    x: torch.Tensor  # [N, ...]
    y: torch.Tensor  # [N] int64
    ids: torch.Tensor  # [N] int64


def load_eval_data(pipeline: Pipeline, b: Behavior, i: int) -> EvalData:
    where = f"{pipeline.path}: behaviors[{i}].data"
    if "file" in b.data:
        d = load_tensors(b.data["file"])
        where = str(b.data["file"])
    else:
        fn = pipeline.resolve(b.data["factory"], f"behaviors[{i}].data.factory")
        d = fn(**b.data.get("kwargs", {}))
    if not isinstance(d, dict) or "x" not in d or "y" not in d:
        raise AuditorError("expected tensors 'x' and 'y' (and optionally 'ids')", where=where)
    x, y = torch.as_tensor(d["x"]), torch.as_tensor(d["y"])
    if y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise AuditorError(f"x has {x.shape[0]} rows and y has shape {tuple(y.shape)}; expected y of shape [N] "
                           "with N = rows of x", where=where)
    if y.dtype.is_floating_point:
        raise AuditorError(f"y has dtype {y.dtype}; expected integer class labels", where=where)
    ids = torch.as_tensor(d["ids"]) if "ids" in d else torch.arange(len(y))
    y = y.long()
    keep = torch.ones(len(y), dtype=torch.bool)
    if b.subset:
        if "labels" in b.subset:
            keep &= torch.isin(y, torch.tensor(b.subset["labels"]))
        if "exclude_labels" in b.subset:
            keep &= ~torch.isin(y, torch.tensor(b.subset["exclude_labels"]))
    if not keep.any():
        raise AuditorError("the subset selects no examples", where=f"{pipeline.path}: behaviors[{i}].subset")
    if b.image_shape is not None and int(torch.tensor(x.shape[1:]).prod()) != int(torch.tensor(b.image_shape).prod()):
        raise AuditorError(f"image_shape {list(b.image_shape)} does not fit examples of shape {list(x.shape[1:])}",
                           where=f"{pipeline.path}: behaviors[{i}].data.image_shape")
    return EvalData(x=x[keep], y=y[keep], ids=ids[keep].long())


def per_example(kind: str, logits: torch.Tensor, y: torch.Tensor, cls: int | None,
                user_fn: Callable | None = None) -> torch.Tensor:
    """f_i from logits [N, C] and labels [N] → [N].

    loss: cross-entropy −log softmax(z)_y;  prob: softmax(z)_c;  margin: z_c − max_{j≠c} z_j;
    accuracy: 1[argmax z = y];  callable: user_fn(logits, y).
    """
    if kind == "loss":
        return F.cross_entropy(logits, y, reduction="none")
    if kind == "prob":
        return torch.softmax(logits, dim=-1)[:, cls]
    if kind == "margin":
        others = logits.clone()
        others[:, cls] = -torch.inf
        return logits[:, cls] - others.max(dim=-1).values
    if kind == "accuracy":
        return (logits.argmax(dim=-1) == y).to(logits.dtype)
    if kind == "callable":
        return user_fn(logits, y)
    raise AuditorError(f"unknown behavior kind {kind!r}")


def behavior_fn(model: torch.nn.Module, b: Behavior, data: EvalData, buffers: dict[str, torch.Tensor],
                user_fn: Callable | None = None, chunk: int | None = None) -> Callable[[dict], torch.Tensor]:
    """f(params) -> Tensor[N]: the behaviour on every evaluation example, in chunks of ``chunk`` rows."""
    x, y = data.x, data.y
    n_classes_checked = {}

    def f(params: dict[str, torch.Tensor]) -> torch.Tensor:
        outs = []
        step = chunk or len(y)
        for s in range(0, len(y), step):
            logits = torch.func.functional_call(model, {**buffers, **params}, (x[s:s + step],))
            if not n_classes_checked and b.cls is not None and b.cls >= logits.shape[-1]:
                raise AuditorError(f"class {b.cls} does not exist; the model has {logits.shape[-1]} outputs",
                                   where=f"behaviors.{b.name}.class")
            n_classes_checked[True] = True
            val = per_example(b.kind, logits, y[s:s + step], b.cls, user_fn)
            if val.shape != (len(y[s:s + step]),):
                raise AuditorError(f"{b.callable} returned shape {tuple(val.shape)}; expected one value per example",
                                   where=f"behaviors.{b.name}.callable")
            outs.append(val)
        return torch.cat(outs)

    return f


def aggregate(values: torch.Tensor, how: str) -> float:
    return float(values.sum() if how == "sum" else values.mean())
