"""A tiny multi-stage pipeline written to disk, with brute-force retraining as ground truth.

The model is one linear layer (``lin.weight`` [3, 4], ``lin.bias`` [3]) in float64. Training
steps use torch.optim (SGD / AdamW) so that the optimizer semantics under test are PyTorch's
own, not a re-implementation. With ``loss="linear"`` every step's loss is L_t(θ) = Σ_p c_{t,p}·θ_p
with fixed random c_t: its gradient does not depend on θ, which is the setting in which the AA
estimator is exact (ESTIMATORS.md §4.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import save_file


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x)


def build_model():
    return Toy().double()


@dataclass
class StageSpec:
    name: str
    kind: str = "sgd"  # sgd | adamw
    reset: bool = True
    nesterov: bool = False
    steps: int = 5
    # per group: callables step -> value, or constants
    lr: dict = field(default_factory=lambda: {"w": 0.1, "b": 0.05})
    momentum: dict = field(default_factory=lambda: {"w": 0.9, "b": 0.5})
    weight_decay: dict = field(default_factory=lambda: {"w": 0.01, "b": 0.0})


GROUPS = {"w": ["*.weight"], "b": ["*.bias"]}


def _val(v, i):
    return v(i) if callable(v) else v


def _make_opt(model, spec: StageSpec):
    groups = [{"params": [model.lin.weight], "name": "w"}, {"params": [model.lin.bias], "name": "b"}]
    if spec.kind == "adamw":
        return torch.optim.AdamW(groups, lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    return torch.optim.SGD(groups, lr=0.01, momentum=0.9, nesterov=spec.nesterov)


def run_stage(model, opt, spec: StageSpec, first_step: int, costs, loss: str, log_rows=None, ckpt_cb=None):
    """Run one stage's steps in place; ``costs[t]`` is the step's random data (linear: c_t per param)."""
    for i in range(spec.steps):
        t = first_step + i
        for g in opt.param_groups:
            g["lr"] = _val(spec.lr[g["name"]], i)
            g["weight_decay"] = _val(spec.weight_decay[g["name"]], i)
            if spec.kind == "sgd":
                g["momentum"] = _val(spec.momentum[g["name"]], i)
            row = {"step": t, "stage": spec.name, "group": g["name"], "lr": g["lr"],
                   "momentum": g.get("momentum", 0.0) if spec.kind == "sgd" else 0.0,
                   "weight_decay": g["weight_decay"]}
            if spec.kind == "adamw":
                row.update(beta1=g["betas"][0], beta2=g["betas"][1], eps=g["eps"])
            if log_rows is not None:
                log_rows.append(row)
        opt.zero_grad()
        if loss == "linear":
            L = sum((costs[t][n] * p).sum() for n, p in model.named_parameters())
        else:  # quadratic: a least-squares fit of a random batch
            x, y = costs[t]["x"], costs[t]["y"]
            L = ((model(x) - y) ** 2).mean()
        L.backward()
        opt.step()
        if ckpt_cb is not None:
            ckpt_cb(t + 1)


def _momentum_state(model, opt) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        st = opt.state.get(p, {})
        if "momentum_buffer" in st and st["momentum_buffer"] is not None:
            out[f"momentum_buffer.{n}"] = st["momentum_buffer"].detach().clone()
        if "exp_avg" in st:
            out[f"exp_avg.{n}"] = st["exp_avg"].detach().clone()
            out[f"exp_avg_sq.{n}"] = st["exp_avg_sq"].detach().clone()
    return out


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _sd(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def train(stages: list[StageSpec], costs, loss: str, start: dict | None = None, skip: int | None = None,
          record: dict | None = None):
    """Run the pipeline (optionally without stage ``skip``); returns final params.

    ``record`` (a dict) receives per-stage start/end state dicts, optimizer states and log rows.
    """
    torch.manual_seed(0)
    model = build_model()
    if start is not None:
        model.load_state_dict(start)
    opt = None
    step = 0
    for k, spec in enumerate(stages):
        if spec.reset or opt is None:
            opt = _make_opt(model, spec)
        if record is not None:
            record.setdefault("start", []).append(_sd(model))
            record.setdefault("first_step", []).append(step)
        if k == skip:
            step += spec.steps  # the stage's steps are not executed; θ and optimizer state stay
            if record is not None:
                record.setdefault("end", []).append(_sd(model))
            continue
        rows = []
        run_stage(model, opt, spec, step, costs, loss, rows)
        step += spec.steps
        if record is not None:
            record.setdefault("end", []).append(_sd(model))
            record.setdefault("optim", []).append(_momentum_state(model, opt))
            record.setdefault("logs", []).append(rows)
    return _params(model)


def make_costs(stages, loss: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    total = sum(s.steps for s in stages)
    shapes = {"lin.weight": (3, 4), "lin.bias": (3,)}
    if loss == "linear":
        return [{n: torch.randn(*sh, generator=g, dtype=torch.float64) for n, sh in shapes.items()}
                for _ in range(total)]
    return [{"x": torch.randn(8, 4, generator=g, dtype=torch.float64),
             "y": torch.randn(8, 3, generator=g, dtype=torch.float64)} for _ in range(total)]


def write_pipeline(root: Path, stages: list[StageSpec], loss: str = "linear", behaviors=None,
                   extra: dict | None = None, n_eval: int = 12) -> Path:
    """Train the toy, retrain each counterfactual, write YAML + artifacts into ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    costs = make_costs(stages, loss)
    rec: dict = {}
    train(stages, costs, loss, record=rec)
    init = rec["start"][0]
    import pandas as pd

    g = torch.Generator().manual_seed(1)
    x = torch.randn(n_eval, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n_eval,), generator=g)
    save_file({"x": x, "y": y, "ids": torch.arange(100, 100 + n_eval)}, str(root / "eval.safetensors"))
    ystages = []
    for k, spec in enumerate(stages):
        save_file(rec["start"][k], str(root / f"{spec.name}_start.safetensors"))
        save_file(rec["end"][k], str(root / f"{spec.name}_end.safetensors"))
        save_file(rec["optim"][k] or {"_empty": torch.zeros(1)}, str(root / f"{spec.name}_optim.safetensors"))
        pd.DataFrame(rec["logs"][k]).to_csv(root / f"{spec.name}_log.csv", index=False)
        cf = train(stages, costs, loss, start=init, skip=k)
        save_file({n: v.contiguous() for n, v in cf.items()}, str(root / f"cf_{spec.name}.safetensors"))
        ystages.append({
            "name": spec.name, "owner": "team", "optimizer": {"kind": spec.kind, "nesterov": spec.nesterov},
            "reset": spec.reset, "start_checkpoint": f"{spec.name}_start.safetensors",
            "end_checkpoint": f"{spec.name}_end.safetensors", "optimizer_state": f"{spec.name}_optim.safetensors",
            "log": f"{spec.name}_log.csv",
            "param_groups": [{"name": n, "params": pats} for n, pats in GROUPS.items()],
            "counterfactual_checkpoint": f"cf_{spec.name}.safetensors",
        })
    doc = {
        "format": 1, "system": {"name": "toy", "version": "0", "owner": "tests"},
        "model": {"factory": "toy:build_model"}, "stages": ystages,
        "behaviors": behaviors or [
            {"name": "loss", "data": {"file": "eval.safetensors"}, "kind": "loss"},
            {"name": "prob1", "data": {"file": "eval.safetensors"}, "kind": "prob", "class": 1},
            {"name": "margin0", "data": {"file": "eval.safetensors"}, "kind": "margin", "class": 0},
            {"name": "acc", "data": {"file": "eval.safetensors"}, "kind": "accuracy"},
        ],
        **(extra or {}),
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    (root / "toy.py").write_text(Path(__file__).read_text())
    return path


def true_displacements(root: Path, stages: list[StageSpec], loss: str = "linear") -> list[dict]:
    """θ_T − θ_T^(−k) for each k, by retraining (brute force)."""
    costs = make_costs(stages, loss)
    rec: dict = {}
    theta_T = train(stages, costs, loss, record=rec)
    return [{n: theta_T[n] - v for n, v in train(stages, costs, loss, start=rec["start"][0], skip=k).items()}
            for k in range(len(stages))]


def np_close(a, b, rtol):
    a, b = np.asarray(a, float), np.asarray(b, float)
    scale = max(np.abs(b).max(), 1e-12)
    return float(np.abs(a - b).max() / scale) <= rtol, float(np.abs(a - b).max() / scale)



def build_artifacts(root, progress=None):
    """A stand-in build factory: records that it ran (tests check when auditor calls it)."""
    (Path(root) / "BUILT").write_text("1")
