"""Loading state dicts and optimizer states without unpickling untrusted data.

safetensors files are read with ``safetensors.torch.load_file``; ``.pt`` files only with
``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import AuditorError


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` mapping from a safetensors or ``.pt`` file."""
    path = Path(path)
    if not path.is_file():
        raise AuditorError("file not found", where=str(path))
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        if path.suffix in (".pt", ".pth", ".bin"):
            import pickle
            import warnings

            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    obj = torch.load(path, map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError):
                raise AuditorError("refused: the file holds pickled objects other than tensors or is not a torch "
                                   "file (auditor loads .pt files with weights_only=True and never unpickles "
                                   "arbitrary objects; save a state dict of tensors, or use safetensors)",
                                   where=str(path)) from None
            if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
                raise AuditorError("expected a flat state dict {name: tensor}", where=str(path))
            return dict(obj)
    except AuditorError:
        raise
    except Exception as exc:  # safetensors / torch raise a variety of types on corrupt files
        raise AuditorError(f"cannot read tensors ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})",
                           where=str(path)) from None
    raise AuditorError(f"unknown checkpoint extension {path.suffix!r}; expected .safetensors or .pt", where=str(path))


def load_params(path: Path, names: list[str], shapes: dict[str, torch.Size], *, dtype: torch.dtype,
                device: torch.device) -> dict[str, torch.Tensor]:
    """The model parameters ``names`` from a checkpoint, checked against the model's shapes."""
    sd = load_tensors(path)
    missing = [n for n in names if n not in sd]
    if missing:
        raise AuditorError(f"parameter {missing[0]!r} is missing ({len(missing)} missing); expected the keys of "
                           "model.state_dict()", where=str(path))
    for n in names:
        if tuple(sd[n].shape) != tuple(shapes[n]):
            raise AuditorError(f"parameter {n!r} has shape {tuple(sd[n].shape)}; the model expects "
                               f"{tuple(shapes[n])}", where=str(path))
        if not sd[n].is_floating_point():
            raise AuditorError(f"parameter {n!r} has dtype {sd[n].dtype}; expected floating-point weights",
                               where=str(path))
        if not torch.isfinite(sd[n]).all():
            raise AuditorError(f"parameter {n!r} holds NaN or inf", where=str(path))
    return {n: sd[n].to(device=device, dtype=dtype) for n in names}


def load_momentum(path: Path | None, names: list[str], shapes: dict[str, torch.Size], *, dtype: torch.dtype,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """SGD momentum buffers (``momentum_buffer.<param>``); zeros where absent or when ``path`` is None."""
    sd = load_tensors(path) if path is not None else {}
    unknown = sorted(k for k in sd if k.startswith("momentum_buffer.") and k[len("momentum_buffer."):] not in shapes)
    if unknown:
        raise AuditorError(f"{unknown[0]} names no parameter of the model; expected momentum_buffer.<parameter name>",
                           where=str(path))
    out = {}
    for n in names:
        t = sd.get(f"momentum_buffer.{n}")
        if t is None:
            out[n] = torch.zeros(shapes[n], dtype=dtype, device=device)
            continue
        if tuple(t.shape) != tuple(shapes[n]):
            raise AuditorError(f"momentum_buffer.{n} has shape {tuple(t.shape)}; expected {tuple(shapes[n])}",
                               where=str(path))
        if not torch.isfinite(t).all():
            raise AuditorError(f"momentum_buffer.{n} holds NaN or inf", where=str(path))
        out[n] = t.to(device=device, dtype=dtype)
    return out


def load_optimizer_state(path: Path) -> dict[str, torch.Tensor]:
    """An optimizer-state file as replay entry points take it: its tensors plus ``step`` (a scalar
    tensor) from the safetensors metadata, when present."""
    state = load_tensors(path)
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise AuditorError(f"{bad[0]} holds NaN or inf", where=str(path))
    if Path(path).suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if "step" in meta:
            try:
                state["step"] = torch.tensor(float(meta["step"]))
            except ValueError:
                raise AuditorError(f"metadata step {meta['step']!r}; expected a number", where=str(path)) from None
    return state
