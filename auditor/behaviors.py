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
from .pipeline import Behavior, Pipeline, call_user


@dataclass
class EvalData:
    x: torch.Tensor  # [N, ...]
    y: torch.Tensor  # [N] int64
    ids: torch.Tensor  # [N] int64


def data_key(b: Behavior) -> tuple:
    """Behaviours with the same key read the same evaluation data (their logits are shared)."""
    if "file" in b.data:
        return ("file", str(b.data["file"]))
    return ("factory", b.data["factory"], repr(sorted(b.data.get("kwargs", {}).items())))


def load_eval_data(pipeline: Pipeline, b: Behavior, i: int) -> EvalData:
    """The behaviour's evaluation examples, its subset applied."""
    data = load_eval_source(pipeline, b, i)
    keep = subset_mask(pipeline, b, i, data.y)
    return EvalData(x=data.x[keep], y=data.y[keep], ids=data.ids[keep])


def subset_mask(pipeline: Pipeline, b: Behavior, i: int, y: torch.Tensor) -> torch.Tensor:
    """Bool [N]: the rows of the data file that the behaviour's subset keeps."""
    keep = torch.ones(len(y), dtype=torch.bool, device=y.device)
    if b.subset:
        if "labels" in b.subset:
            keep &= torch.isin(y, torch.tensor(b.subset["labels"], device=y.device))
        if "exclude_labels" in b.subset:
            keep &= ~torch.isin(y, torch.tensor(b.subset["exclude_labels"], device=y.device))
    if not keep.any():
        raise AuditorError("the subset selects no examples", where=f"{pipeline.path}: behaviors[{i}].subset")
    return keep


def load_eval_source(pipeline: Pipeline, b: Behavior, i: int) -> EvalData:
    """Every example of the behaviour's data file or factory (no subset)."""
    where = f"{pipeline.path}: behaviors[{i}].data"
    if "file" in b.data:
        d = load_tensors(b.data["file"])
        where = str(b.data["file"])
    else:
        fn = pipeline.resolve(b.data["factory"], f"behaviors[{i}].data.factory")
        d = call_user(fn, where, **b.data.get("kwargs", {}))
    if not isinstance(d, dict) or "x" not in d or "y" not in d:
        raise AuditorError("expected tensors 'x' and 'y' (and optionally 'ids')", where=where)
    try:
        x, y = torch.as_tensor(d["x"]), torch.as_tensor(d["y"])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise AuditorError(f"x and y must be tensors or nested lists of numbers ({exc})", where=where) from None
    if len(y) == 0:
        raise AuditorError("the evaluation data has no examples", where=where)
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise AuditorError("x holds NaN or inf; expected finite inputs", where=where)
    if y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise AuditorError(f"x has {x.shape[0]} rows and y has shape {tuple(y.shape)}; expected y of shape [N] "
                           "with N = rows of x", where=where)
    if y.dtype.is_floating_point:
        raise AuditorError(f"y has dtype {y.dtype}; expected integer class labels", where=where)
    ids = torch.as_tensor(d["ids"]) if "ids" in d else torch.arange(len(y))
    y = y.long()
    if ids.shape != y.shape:
        raise AuditorError(f"ids has shape {tuple(ids.shape)}; expected {tuple(y.shape)}", where=where)
    if len(torch.unique(ids)) != len(ids):
        raise AuditorError("ids repeat; expected one id per example", where=where)
    if not x.is_floating_point():  # integer-coded inputs (pixel counts, say) are fed to the model as floats
        x = x.to(torch.get_default_dtype())
    if b.image_shape is not None and int(torch.tensor(x.shape[1:]).prod()) != int(torch.tensor(b.image_shape).prod()):
        raise AuditorError(f"image_shape {list(b.image_shape)} does not fit examples of shape {list(x.shape[1:])}",
                           where=f"{pipeline.path}: behaviors[{i}].data.image_shape")
    return EvalData(x=x, y=y, ids=ids.long())


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
        return call_user(user_fn, "behaviors[].callable", logits, y)
    raise AuditorError(f"unknown behavior kind {kind!r}")


def behavior_fn(model: torch.nn.Module, b: Behavior, data: EvalData, buffers: dict[str, torch.Tensor],
                user_fn: Callable | None = None, chunk: int | None = None) -> Callable[[dict], torch.Tensor]:
    """f(params) -> Tensor[N]: the behaviour on every evaluation example (f = g ∘ z)."""
    z, g = logits_fn(model, data.x, buffers, chunk), kind_fn(b, data.y, user_fn)
    return lambda params: g(z(params))


def logits_fn(model: torch.nn.Module, x: torch.Tensor, buffers: dict[str, torch.Tensor],
              chunk: int | None = None) -> Callable[[dict], torch.Tensor]:
    """z(params) -> Tensor[N, C]: the model's outputs on every example, in chunks of ``chunk`` rows.
    Composes with torch.func.jvp (one forward-mode pass gives ż = J_z e for all examples)."""
    def z(params: dict[str, torch.Tensor]) -> torch.Tensor:
        step = chunk or len(x)
        out = [torch.func.functional_call(model, {**buffers, **params}, (x[s:s + step],))
               for s in range(0, len(x), step)]
        return torch.cat(out)

    return z


def check_classes(b: Behavior, y: torch.Tensor, n_outputs: int) -> None:
    """The behaviour's class and (for loss/accuracy) its labels must name an output of the model."""
    if b.cls is not None and b.cls >= n_outputs:
        raise AuditorError(f"class {b.cls} does not exist; the model has {n_outputs} outputs",
                           where=f"behaviors.{b.name}.class")
    if b.kind in ("loss", "accuracy") and len(y) and (int(y.min()) < 0 or int(y.max()) >= n_outputs):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise AuditorError(f"label {bad} is outside the model's {n_outputs} classes [0, {n_outputs - 1}]",
                           where=f"behaviors.{b.name}.data")


def kind_fn(b: Behavior, y: torch.Tensor, user_fn: Callable | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """g(z) -> Tensor[n]: the behaviour from the logits of its own rows (f = g ∘ z)."""
    def g(z: torch.Tensor) -> torch.Tensor:
        check_classes(b, y, z.shape[-1])
        val = per_example(b.kind, z, y, b.cls, user_fn)
        if not isinstance(val, torch.Tensor) or val.shape != (len(y),):
            shape = tuple(val.shape) if isinstance(val, torch.Tensor) else type(val).__name__
            raise AuditorError(f"{b.callable} returned {shape}; expected a tensor with one value per example",
                               where=f"behaviors.{b.name}.callable")
        return val

    return g


def aggregate(values: torch.Tensor, how: str) -> float:
    return float(values.sum() if how == "sum" else values.mean())
