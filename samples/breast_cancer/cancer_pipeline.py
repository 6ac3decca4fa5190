"""Sample pipeline: a tumour-triage classifier trained in four stages on scikit-learn's
bundled breast-cancer data (569 x 30, binary; sklearn's encoding: 0 = malignant, 1 = benign).

Model: a small residual MLP with LayerNorm and GELU (30 -> 32, one pre-norm residual block
32 -> 64 -> 32, LayerNorm, head -> 2). Optimizer: torch.optim.AdamW with two parameter groups
(``decay``: the Linear weights; ``no_decay``: biases and LayerNorm parameters), linear warmup +
cosine decay within each stage. Everything is float32 on CPU, seeded and deterministic.

Stages (see ``STAGES``):

1. ``pretrain``        clean data, fresh optimizer.
2. ``shift_finetune``  "Site B" data with a calibration drift (lengths x1.15, areas x1.15^2,
                       texture +2.0 in raw units), fresh optimizer.
3. ``refine``          mixed clean + Site B data, CARRIES the AdamW state of stage 2.
4. ``calibrate``       short, clean held-out-style data, fresh optimizer.

Entry points (referenced from ``pipeline.yaml``):

- ``build_model(**kwargs) -> nn.Module``
- ``build_artifacts(root, progress=None, steps_scale=1.0)`` writes ``root/artifacts/``
- ``stage_data(stage_name) -> {"x", "y", "ids"}``
- ``replay_stage(model, stage_name, params, optimizer_state, *, artifacts=None)``

The per-step log's ``batch`` column holds example *ids* (values of ``stage_data(s)["ids"]``,
which are sklearn row indices), not positions.

Run ``python samples/breast_cancer/cancer_pipeline.py`` to build the artifacts and print the
figures (accuracy per stage, true stage effects).
"""

from __future__ import annotations

import contextlib
import csv
import fnmatch
import functools
import io
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file, safe_open
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
ARTIFACTS = HERE / "artifacts"

SEED = 20240607
BATCH_SIZE = 32
CHECKPOINT_EVERY = 25
MALIGNANT = 0  # sklearn's load_breast_cancer: target_names == ['malignant', 'benign']

MODEL_KWARGS = {"in_features": 30, "width": 32, "hidden": 64, "n_classes": 2}

# Parameter groups: every parameter matches exactly one pattern of exactly one group
# (the same patterns are written in pipeline.yaml; a test checks they agree).
PARAM_GROUPS: list[tuple[str, list[str]]] = [
    ("decay", ["inp.weight", "block.fc*.weight", "head.weight"]),
    ("no_decay", ["*.bias", "*norm.weight"]),
]

LOG_COLUMNS = ["step", "stage", "group", "lr", "momentum", "weight_decay", "beta1", "beta2", "eps", "batch"]

# Split sizes (the 455 training rows are partitioned; the test set is 114 rows).
N_TEST = 114
PARTS = {"pretrain": 180, "site_b": 140, "refine_clean": 75, "calibrate": 60}
N_REFINE_SITE_B = 75  # refine mixes its 75 clean rows with the first 75 Site B rows

# Site B's calibration drift, in raw feature units (applied before standardisation).
LENGTH_SCALE = 1.15
TEXTURE_OFFSET = 2.0


@dataclass(frozen=True)
class StageSpec:
    name: str
    steps: int
    reset: bool
    lr: float
    warmup: int
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    min_lr_ratio: float = 0.1


STAGES: list[StageSpec] = [
    StageSpec("pretrain", steps=150, reset=True, lr=3e-3, warmup=15, weight_decay=0.02),
    StageSpec("shift_finetune", steps=125, reset=True, lr=2e-3, warmup=10, weight_decay=0.02),
    StageSpec("refine", steps=125, reset=False, lr=1e-3, warmup=5, weight_decay=0.02),
    StageSpec("calibrate", steps=50, reset=True, lr=5e-4, warmup=5, weight_decay=0.01, betas=(0.9, 0.99)),
]
STAGE_NAMES = [s.name for s in STAGES]


# --------------------------------------------------------------------------- model

class ResidualBlock(nn.Module):
    """Pre-norm residual MLP block: x + fc2(gelu(fc1(norm(x))))."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class ResMLP(nn.Module):
    def __init__(self, in_features: int = 30, width: int = 32, hidden: int = 64, n_classes: int = 2):
        super().__init__()
        self.inp = nn.Linear(in_features, width)
        self.block = ResidualBlock(width, hidden)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.inp(x))
        h = self.block(h)
        return self.head(self.norm(h))


def build_model(seed: int = SEED, **kwargs) -> nn.Module:
    """The classifier (float32), initialised from ``seed`` without touching the global RNG."""
    cfg = {**MODEL_KWARGS, **kwargs}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ResMLP(**cfg)


def param_group_of(name: str) -> str:
    """The parameter group of ``name`` (exactly one pattern must match)."""
    hits = [g for g, pats in PARAM_GROUPS for p in pats if fnmatch.fnmatchcase(name, p)]
    if len(hits) != 1:
        raise ValueError(f"parameter {name!r} matches {len(hits)} group patterns; expected exactly one")
    return hits[0]


# --------------------------------------------------------------------------- data

def _shift(raw: np.ndarray, feature_names: list[str]) -> np.ndarray:
    """Site B's calibration drift: lengths x1.15, areas x1.15^2, texture (mean, worst) +2.0."""
    out = raw.copy()
    for j, name in enumerate(feature_names):
        if "radius" in name or "perimeter" in name:
            out[:, j] *= LENGTH_SCALE
        elif "area" in name:
            out[:, j] *= LENGTH_SCALE ** 2
        elif name in ("mean texture", "worst texture"):
            out[:, j] += TEXTURE_OFFSET
    return out


@functools.lru_cache(maxsize=1)
def _dataset() -> dict:
    """Deterministic stratified split and standardisation (float64 statistics of the clean training rows)."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    assert list(d.target_names) == ["malignant", "benign"]
    raw = np.asarray(d.data, dtype=np.float64)
    y = np.asarray(d.target, dtype=np.int64)
    names = [str(n) for n in d.feature_names]
    rng = np.random.RandomState(SEED)

    # Stratified: interleave the shuffled rows of each class so every slice keeps the class ratio.
    order_by_class = [rng.permutation(np.flatnonzero(y == c)) for c in (0, 1)]
    keys = np.concatenate([(np.arange(len(o)) + 0.5) / len(o) for o in order_by_class])
    rows = np.concatenate(order_by_class)
    rows = rows[np.argsort(keys, kind="stable")]
    test_rows = np.sort(rows[::5][:N_TEST])
    train_rows = np.setdiff1d(rows, test_rows, assume_unique=False)
    train_rows = train_rows[rng.permutation(len(train_rows))]
    assert len(train_rows) == sum(PARTS.values())

    parts, at = {}, 0
    for part, n in PARTS.items():
        parts[part] = np.sort(train_rows[at:at + n])
        at += n

    mean = raw[train_rows].mean(axis=0)
    std = raw[train_rows].std(axis=0)
    clean = ((raw - mean) / std).astype(np.float32)
    shifted = ((_shift(raw, names) - mean) / std).astype(np.float32)
    return {"clean": clean, "shifted": shifted, "y": y, "test_rows": test_rows, "parts": parts,
            "feature_names": names}


def _pack(x: np.ndarray, y: np.ndarray, ids: np.ndarray) -> dict[str, Tensor]:
    return {"x": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).clone(),
            "y": torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)).clone(),
            "ids": torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).clone()}


def stage_data(stage_name: str) -> dict[str, Tensor]:
    """The stage's training examples: x [N,30] float32, y [N] int64, ids [N] int64 (sklearn row indices)."""
    d = _dataset()
    p = d["parts"]
    if stage_name == "pretrain":
        r = p["pretrain"]
        return _pack(d["clean"][r], d["y"][r], r)
    if stage_name == "shift_finetune":
        r = p["site_b"]
        return _pack(d["shifted"][r], d["y"][r], r)
    if stage_name == "refine":
        rc, rs = p["refine_clean"], p["site_b"][:N_REFINE_SITE_B]
        x = np.concatenate([d["clean"][rc], d["shifted"][rs]])
        r = np.concatenate([rc, rs])
        return _pack(x, d["y"][r], r)
    if stage_name == "calibrate":
        r = p["calibrate"]
        return _pack(d["clean"][r], d["y"][r], r)
    raise ValueError(f"unknown stage {stage_name!r}; expected one of {STAGE_NAMES}")


def test_data(shifted: bool = False) -> dict[str, Tensor]:
    """The evaluation set (clean, or under Site B's drift); ids are sklearn row indices."""
    d = _dataset()
    r = d["test_rows"]
    return _pack((d["shifted"] if shifted else d["clean"])[r], d["y"][r], r)


test_data.__test__ = False  # not a pytest test


# --------------------------------------------------------------------------- schedule and log

def _stage_steps(spec: StageSpec, steps_scale: float) -> int:
    return max(1, int(round(spec.steps * steps_scale)))


def _lr_factor(i: int, n: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` at the stage's end."""
    if i < warmup:
        return (i + 1) / warmup
    span = max(1, n - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * (i - warmup) / span))


def _stage_batches(stage_index: int, n_examples: int, n_steps: int) -> list[np.ndarray]:
    """Positions of each step's minibatch: a stream of epoch permutations cut into batches of 32."""
    rng = np.random.RandomState(SEED + 1000 * (stage_index + 1))
    stream: list[int] = []
    while len(stream) < n_steps * BATCH_SIZE:
        stream.extend(rng.permutation(n_examples).tolist())
    return [np.asarray(stream[i * BATCH_SIZE:(i + 1) * BATCH_SIZE]) for i in range(n_steps)]


def _make_log(spec: StageSpec, stage_index: int, first_step: int, n_steps: int) -> str:
    """The stage's per-step log as CSV text (one row per step and parameter group)."""
    ids = stage_data(spec.name)["ids"].numpy()
    warmup = min(spec.warmup, max(0, n_steps - 1))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(LOG_COLUMNS)
    for i, pos in enumerate(_stage_batches(stage_index, len(ids), n_steps)):
        lr = spec.lr * _lr_factor(i, n_steps, warmup, spec.min_lr_ratio)
        batch = " ".join(str(int(v)) for v in ids[pos])
        for group, _ in PARAM_GROUPS:
            wd = spec.weight_decay if group == "decay" else 0.0
            w.writerow([first_step + i, spec.name, group, repr(lr), repr(0.0), repr(wd),
                        repr(spec.betas[0]), repr(spec.betas[1]), repr(spec.eps), batch])
    return buf.getvalue()


@dataclass
class _Step:
    step: int
    batch: list[int]
    hyper: dict[str, dict[str, float]]  # group -> {lr, weight_decay, beta1, beta2, eps}


def _parse_log(text: str, stage_name: str) -> list[_Step]:
    """Parse a log (exact float round trip: values are written with repr)."""
    steps: dict[int, _Step] = {}
    for row in csv.DictReader(io.StringIO(text)):
        if row["stage"] != stage_name:
            raise ValueError(f"log row names stage {row['stage']!r}; expected {stage_name!r}")
        t = int(row["step"])
        st = steps.setdefault(t, _Step(t, [int(v) for v in row["batch"].split()], {}))
        st.hyper[row["group"]] = {k: float(row[k]) for k in ("lr", "weight_decay", "beta1", "beta2", "eps")}
    out = [steps[t] for t in sorted(steps)]
    for a, b in zip(out, out[1:]):
        if b.step != a.step + 1:
            raise ValueError(f"log of stage {stage_name!r} is not contiguous at step {a.step}")
    return out


# --------------------------------------------------------------------------- training (one code path)

def _named_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())


def _make_optimizer(model: nn.Module, optimizer_state: dict[str, Tensor] | None) -> torch.optim.AdamW:
    named = _named_params(model)
    groups = []
    for group, _ in PARAM_GROUPS:
        ps = [p for n, p in named.items() if param_group_of(n) == group]
        groups.append({"params": ps, "name": group})
    opt = torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, foreach=False, fused=False)
    if optimizer_state:
        if "step" not in optimizer_state:
            raise ValueError("optimizer_state has moments but no 'step' (the AdamW step count)")
        step = float(optimizer_state["step"])
        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        for n, p in named.items():
            m = optimizer_state.get(f"exp_avg.{n}")
            v = optimizer_state.get(f"exp_avg_sq.{n}")
            if m is None and v is None:
                continue
            opt.state[p] = {
                "step": torch.tensor(step, dtype=scalar),
                "exp_avg": (m if m is not None else torch.zeros_like(p)).detach().to(p.dtype).clone(),
                "exp_avg_sq": (v if v is not None else torch.zeros_like(p)).detach().to(p.dtype).clone(),
            }
    return opt


def _optimizer_state_dict(model: nn.Module, opt: torch.optim.AdamW) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    steps = set()
    for n, p in _named_params(model).items():
        s = opt.state.get(p)
        if not s:
            continue
        out[f"exp_avg.{n}"] = s["exp_avg"].detach().clone()
        out[f"exp_avg_sq.{n}"] = s["exp_avg_sq"].detach().clone()
        steps.add(float(s["step"]))
    if steps:
        if len(steps) != 1:
            raise RuntimeError(f"parameters disagree on the AdamW step count: {sorted(steps)}")
        out["step"] = torch.tensor(steps.pop(), dtype=torch.float32)
    return out


@contextlib.contextmanager
def _single_thread():
    """Intra-op threads = 1 while training: the results then do not depend on the caller's
    thread setting (bitwise replay), and a model this small runs fastest on one thread."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


def _run_stage(model: nn.Module, stage_name: str, log: list[_Step], params: dict[str, Tensor],
               optimizer_state: dict[str, Tensor] | None,
               on_step: Callable[[int, nn.Module], None] | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Run the recorded steps of a stage from ``params`` and ``optimizer_state`` (None = fresh)."""
    with _single_thread():
        return _run_stage_inner(model, stage_name, log, params, optimizer_state, on_step)


def _run_stage_inner(model, stage_name, log, params, optimizer_state, on_step):
    data = stage_data(stage_name)
    dtype = next(model.parameters()).dtype
    x, y = data["x"].to(dtype), data["y"]
    pos = {int(v): i for i, v in enumerate(data["ids"].tolist())}
    model.load_state_dict(params)
    model.train()
    opt = _make_optimizer(model, optimizer_state)
    for st in log:
        for g in opt.param_groups:
            h = st.hyper[g["name"]]
            g["lr"] = h["lr"]
            g["weight_decay"] = h["weight_decay"]
            g["betas"] = (h["beta1"], h["beta2"])
            g["eps"] = h["eps"]
        idx = torch.tensor([pos[i] for i in st.batch], dtype=torch.long)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(st.step + 1, model)
    new_params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return new_params, _optimizer_state_dict(model, opt)


def replay_stage(model: nn.Module, stage_name: str, params: dict[str, Tensor],
                 optimizer_state: dict[str, Tensor] | None, *, artifacts: Path | str | None = None
                 ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Re-run the stage's recorded steps (batches and hyperparameters from its log).

    ``params``: a state dict; ``optimizer_state``: keys ``exp_avg.<param>``, ``exp_avg_sq.<param>``
    and ``step`` (the AdamW step count, a scalar tensor), or None for a fresh optimizer.
    Returns (params, optimizer_state) in the same forms. Runs in the model's dtype.
    ``artifacts`` defaults to the ``artifacts/`` folder beside this file.
    """
    folder = Path(artifacts) if artifacts is not None else ARTIFACTS
    path = folder / f"{stage_name}_log.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no log for stage {stage_name!r}; build the artifacts first")
    log = _parse_log(path.read_text(), stage_name)
    return _run_stage(model, stage_name, log, params, optimizer_state)


# --------------------------------------------------------------------------- file helpers

def save_optimizer_state(state: dict[str, Tensor], path: Path) -> None:
    """safetensors with exp_avg.<param>, exp_avg_sq.<param> and metadata {"step": "<int>"}."""
    tensors = {k: v.contiguous() for k, v in state.items() if k != "step"}
    step = int(float(state["step"])) if "step" in state else 0
    save_file(tensors, str(path), metadata={"step": str(step)})


def load_optimizer_state(path: Path | str) -> dict[str, Tensor]:
    """Inverse of save_optimizer_state: the moments plus ``step`` (float32 scalar) from the metadata."""
    state = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    state["step"] = torch.tensor(float(int(meta.get("step", "0"))), dtype=torch.float32)
    return state


def _save_params(params: dict[str, Tensor], path: Path, global_step: int) -> None:
    save_file({k: v.contiguous() for k, v in params.items()}, str(path),
              metadata={"global_step": str(global_step)})


def checkpoint_plan(steps_scale: float = 1.0) -> list[dict]:
    """Per stage: first_step, n_steps and the intermediate checkpoint steps (multiples of 25 inside it)."""
    plan, t = [], 0
    for spec in STAGES:
        n = _stage_steps(spec, steps_scale)
        inner = [s for s in range(t + 1, t + n) if s % CHECKPOINT_EVERY == 0]
        plan.append({"name": spec.name, "first_step": t, "n_steps": n, "checkpoints": inner})
        t += n
    return plan


# --------------------------------------------------------------------------- build

def build_artifacts(root: Path | str, progress: Callable[[str, float], None] | None = None,
                    steps_scale: float = 1.0) -> None:
    """Train the four stages, retrain every counterfactual, and write ``root/artifacts/``.

    Written to a temporary folder first and renamed into place. ``steps_scale`` < 1 builds a
    shorter variant (tests); the committed pipeline.yaml describes ``steps_scale=1``.
    """
    root = Path(root)
    final = root / "artifacts"
    tmp = root / f".artifacts.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    def report(msg: str, frac: float) -> None:
        if progress is not None:
            progress(msg, float(min(1.0, max(0.0, frac))))

    try:
        report("preparing data", 0.0)
        plan = checkpoint_plan(steps_scale)
        n_jobs = len(STAGES) + sum(len(STAGES) - 1 - k for k in range(len(STAGES)))
        done = 0

        # Evaluation sets.
        for fname, shifted in (("test.safetensors", False), ("test_shifted.safetensors", True)):
            save_file(test_data(shifted), str(tmp / fname))

        model = build_model()
        params = {k: v.detach().clone() for k, v in model.state_dict().items()}
        opt_state: dict[str, Tensor] | None = None
        logs: dict[str, list[_Step]] = {}
        starts: list[dict[str, Tensor]] = []
        entering_state: list[dict[str, Tensor] | None] = []  # optimizer state entering each stage

        for k, (spec, p) in enumerate(zip(STAGES, plan)):
            report(f"training stage {spec.name}", done / n_jobs)
            text = _make_log(spec, k, p["first_step"], p["n_steps"])
            (tmp / f"{spec.name}_log.csv").write_text(text)
            logs[spec.name] = _parse_log(text, spec.name)
            _save_params(params, tmp / f"{spec.name}_start.safetensors", p["first_step"])
            starts.append(params)
            state_in = None if spec.reset else opt_state
            entering_state.append(state_in)
            wanted = set(p["checkpoints"])

            def save_ckpt(step: int, m: nn.Module, wanted=wanted) -> None:
                if step in wanted:
                    _save_params({kk: vv.detach() for kk, vv in m.state_dict().items()},
                                 tmp / f"ckpt_{step:05d}.safetensors", step)

            params, opt_state = _run_stage(model, spec.name, logs[spec.name], params, state_in, on_step=save_ckpt)
            _save_params(params, tmp / f"{spec.name}_end.safetensors", p["first_step"] + p["n_steps"])
            save_optimizer_state(opt_state, tmp / f"{spec.name}_optim.safetensors")
            done += 1

        # Counterfactuals: stage k skipped, later stages replayed with the same batches and hyperparameters.
        for k, spec in enumerate(STAGES):
            cf_params = starts[k]
            cf_state = entering_state[k]  # the state at a_k (fresh if stage k resets)
            for j in range(k + 1, len(STAGES)):
                report(f"retraining without {spec.name}: replaying {STAGES[j].name}", done / n_jobs)
                state_in = None if STAGES[j].reset else cf_state
                cf_params, cf_state = _run_stage(model, STAGES[j].name, logs[STAGES[j].name], cf_params, state_in)
                done += 1
            _save_params(cf_params, tmp / f"cf_without_{spec.name}.safetensors", plan[-1]["first_step"]
                         + plan[-1]["n_steps"])

        old = root / f".artifacts.old-{os.getpid()}"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        if old.exists():
            shutil.rmtree(old)
        report("done", 1.0)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- figures

def _evaluate(params: dict[str, Tensor], dtype=torch.float64) -> dict[str, float]:
    """The four behaviours of pipeline.yaml (mean aggregates) plus shifted accuracy."""
    model = build_model().to(dtype)
    model.load_state_dict(params)
    model.eval()
    out = {}
    with torch.no_grad():
        for tag, shifted in (("test", False), ("shifted_test", True)):
            d = test_data(shifted)
            logits = model(d["x"].to(dtype))
            out[f"{tag}_loss"] = float(F.cross_entropy(logits, d["y"]))
            out[f"{tag}_accuracy"] = float((logits.argmax(1) == d["y"]).to(dtype).mean())
            if not shifted:
                mal = d["y"] == MALIGNANT
                out["malignant_prob"] = float(torch.softmax(logits, 1)[mal, MALIGNANT].mean())
    return out


def figures(artifacts: Path | str | None = None) -> dict:
    """Per-stage metrics at each stage end and the true stage effects tau_k = f(theta_T) - f(cf_k)."""
    folder = Path(artifacts) if artifacts is not None else ARTIFACTS
    per_stage = {s.name: _evaluate(load_file(str(folder / f"{s.name}_end.safetensors"))) for s in STAGES}
    start = _evaluate(load_file(str(folder / f"{STAGES[0].name}_start.safetensors")))
    final = per_stage[STAGES[-1].name]
    behaviours = ["test_loss", "test_accuracy", "shifted_test_loss", "malignant_prob"]
    tau = {}
    for s in STAGES:
        cf = _evaluate(load_file(str(folder / f"cf_without_{s.name}.safetensors")))
        tau[s.name] = {b: final[b] - cf[b] for b in behaviours}
    return {"init": start, "per_stage": per_stage, "tau": tau}


def main() -> None:
    t0 = time.perf_counter()

    def progress(msg: str, frac: float) -> None:
        print(f"[{frac:5.1%}] {msg}", file=sys.stderr)

    build_artifacts(HERE, progress)
    elapsed = time.perf_counter() - t0
    fig = figures()
    print(f"build time: {elapsed:.1f} s  ->  {ARTIFACTS}")
    print(f"{'stage end':16s} {'test acc':>9s} {'shifted acc':>12s} {'test loss':>10s} {'shifted loss':>13s} "
          f"{'P(malig|malig)':>15s}")
    for name, m in [("(init)", fig["init"]), *fig["per_stage"].items()]:
        print(f"{name:16s} {m['test_accuracy']:9.4f} {m['shifted_test_accuracy']:12.4f} {m['test_loss']:10.4f} "
              f"{m['shifted_test_loss']:13.4f} {m['malignant_prob']:15.4f}")
    print("true stage effects tau_k = f(theta_T) - f(theta_T without stage k):")
    print(f"{'stage':16s} {'test_loss':>10s} {'test_acc':>9s} {'shifted_loss':>13s} {'malignant_prob':>15s}")
    for name, t in fig["tau"].items():
        print(f"{name:16s} {t['test_loss']:+10.4f} {t['test_accuracy']:+9.4f} {t['shifted_test_loss']:+13.4f} "
              f"{t['malignant_prob']:+15.4f}")


if __name__ == "__main__":
    main()
