"""Reference sample: a real 3-stage training pipeline on scikit-learn's bundled digits.

Stages (global steps t = 0 … T−1, θ_t = parameters before step t):

    pretrain  (Foundation team)  clean digits, SGD μ=0.9, warmup + cosine lr, fresh optimizer
    finetune  (Applied team)     data with a planted spurious feature: every class-3 image
                                 carries a bright 2×2 patch in the top-left corner;
                                 SGD μ=0.9, constant lr, optimizer state CARRIED from pretrain
    cleanup   (Safety team)      clean curated data, SGD Nesterov μ=0.9, small lr, fresh optimizer

Parameter groups (first match wins): ``decay`` = ``*.weight`` (λ = 5e-4), ``no_decay`` =
``*.bias`` (λ = 0). Every step is real ``torch.optim.SGD`` in float32 on the CPU:
g = ∇L_B(θ) + λθ,  m ← μ m + g,  θ ← θ − η m  (Nesterov: θ ← θ − η (g + μ m)).

The factual run and every counterfactual run go through one function, ``_run_stage``,
driven by the stage's per-step log (the log is written first, then executed), so
``replay_stage`` of a stage from its start checkpoint reproduces its end checkpoint
bit for bit.

Ground truth: for each stage k the build reruns the pipeline without stage k (θ and the
optimizer state stay at their values entering stage k; later stages replay their
recorded batches and hyperparameters; a later stage that resets starts fresh) and writes
the final parameters to ``cf_without_<k>.safetensors``.

Entry points (see pipeline.yaml): ``build_model``, ``build_artifacts``, ``stage_data``,
``replay_stage``. CLI: ``python samples/digits/digits_pipeline.py [--steps-scale S]``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from fnmatch import fnmatch
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
ARTIFACTS = HERE / "artifacts"

N_TEST = 597                      # stratified split: 1200 train / 597 test
SPLIT_SEED = 0
N_PRETRAIN = 800                  # pretrain: first 800 train examples; cleanup: the other 400
PATCH_CLASS = 3                   # the class whose fine-tuning images carry the patch
PATCH_ROWS, PATCH_COLS = slice(0, 2), slice(0, 2)   # top-left 2×2 of the 8×8 image
CKPT_EVERY = 25                   # intermediate checkpoints at global steps t ≡ 0 (mod 25)
WEIGHT_DECAY = 5e-4
GROUPS = (("decay", "*.weight"), ("no_decay", "*.bias"))   # first match wins
LOG_COLUMNS = ("step", "stage", "group", "lr", "momentum", "weight_decay", "batch")

# name -> (steps, batch size, reset optimizer, nesterov, batch-order seed)
STAGES: dict[str, dict] = {
    "pretrain": dict(steps=300, batch=32, reset=True, nesterov=False, seed=101),
    "finetune": dict(steps=200, batch=32, reset=False, nesterov=False, seed=202),
    "cleanup": dict(steps=100, batch=32, reset=True, nesterov=True, seed=303),
}
STAGE_NAMES = tuple(STAGES)

Progress = Callable[[str, float], None] | None


# ----------------------------------------------------------------------------- model


class DigitsMLP(nn.Module):
    """64 → hidden → hidden → 10 ReLU MLP; x [N, 64] in [0, 1] → logits [N, 10]."""

    def __init__(self, hidden: int = 64, n_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.reshape(x.shape[0], -1))


def build_model(hidden: int = 64, seed: int = 0) -> nn.Module:
    """The YAML's model factory. Initialisation is seeded (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitsMLP(hidden=int(hidden))


# ------------------------------------------------------------------------------ data


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x [1797, 64] float32 in [0, 1], y int64, train ids, test ids); ids index load_digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    ids = np.arange(len(y), dtype=np.int64)
    train, test = train_test_split(ids, test_size=N_TEST, stratify=y, random_state=SPLIT_SEED)
    return x, y, train, test


def apply_patch(x: Tensor) -> Tensor:
    """Copy of x [N, 64] with the spurious 2×2 patch set to the maximum value 1.0."""
    img = x.reshape(-1, 8, 8).clone()
    img[:, PATCH_ROWS, PATCH_COLS] = 1.0
    return img.reshape(x.shape)


def _subset(ids: np.ndarray) -> dict[str, Tensor]:
    x, y, _, _ = _digits()
    return {"x": torch.from_numpy(x[ids].copy()), "y": torch.from_numpy(y[ids].copy()),
            "ids": torch.from_numpy(ids.copy())}


def stage_data(stage_name: str) -> dict[str, Tensor]:
    """The stage's training examples: x [n, 64] float32, y [n] int64, ids [n] int64.

    pretrain: 800 clean train images; finetune: all 1200 train images, class 3 patched;
    cleanup: the other 400 clean train images. ids are indices into load_digits().
    """
    _, _, train, _ = _digits()
    if stage_name == "pretrain":
        return _subset(train[:N_PRETRAIN])
    if stage_name == "cleanup":
        return _subset(train[N_PRETRAIN:])
    if stage_name == "finetune":
        d = _subset(train)
        hit = d["y"] == PATCH_CLASS
        d["x"][hit] = apply_patch(d["x"][hit])
        return d
    raise ValueError(f"stage_data: unknown stage {stage_name!r}; expected one of {STAGE_NAMES}")


def eval_data(patched: bool = False) -> dict[str, Tensor]:
    """Test split (597 images): clean, or with the patch applied to every image."""
    _, _, _, test = _digits()
    d = _subset(test)
    if patched:
        d["x"] = apply_patch(d["x"])
    return d


def train_data() -> dict[str, Tensor]:
    """Whole clean train split (1200 images), for accuracy figures."""
    return _subset(_digits()[2])


# -------------------------------------------------------------------------- schedule


def _group_of(name: str) -> str:
    for group, pattern in GROUPS:
        if fnmatch(name, pattern):
            return group
    raise ValueError(f"parameter {name!r} matches no parameter group")


def _stage_steps(stage: str, steps_scale: float) -> int:
    return max(1, round(STAGES[stage]["steps"] * steps_scale))


def _lr(stage: str, i: int, n: int) -> float:
    """Learning rate of the stage's i-th step (0 ≤ i < n)."""
    if stage == "pretrain":      # linear warmup to 0.05, then cosine decay towards 0
        peak, warm = 0.05, max(1, round(0.1 * n))
        if i < warm:
            return peak * (i + 1) / warm
        return 0.5 * peak * (1.0 + math.cos(math.pi * (i - warm) / (n - warm)))
    if stage == "finetune":      # constant
        return 0.03
    return 0.005                 # cleanup: small constant


def _plan(stage: str, first_step: int, steps_scale: float) -> list[dict]:
    """Log rows of the stage: one per (step, group), batches drawn epoch-wise without replacement."""
    cfg, ids = STAGES[stage], stage_data(stage)["ids"].numpy()
    n = _stage_steps(stage, steps_scale)
    rng = np.random.default_rng(cfg["seed"])
    order: list[int] = []
    rows = []
    for i in range(n):
        while len(order) < cfg["batch"]:
            order.extend(rng.permutation(ids).tolist())
        batch, order = order[: cfg["batch"]], order[cfg["batch"]:]
        for group, _ in GROUPS:
            rows.append({"step": first_step + i, "stage": stage, "group": group,
                         "lr": _lr(stage, i, n), "momentum": 0.9,
                         "weight_decay": WEIGHT_DECAY if group == "decay" else 0.0,
                         "batch": " ".join(map(str, batch))})
    return rows


def _write_log(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=LOG_COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({**r, **{k: repr(float(r[k])) for k in ("lr", "momentum", "weight_decay")}})


def _read_log(path: Path, stage: str) -> list[tuple[int, dict[str, dict[str, float]], list[int]]]:
    """[(step, {group: {lr, momentum, weight_decay}}, batch ids)] in step order."""
    steps: dict[int, tuple[dict, list[int]]] = {}
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            if r["stage"] != stage:
                raise ValueError(f"{path}: row for stage {r['stage']!r}, expected {stage!r}")
            t = int(r["step"])
            hyper, batch = steps.setdefault(t, ({}, [int(i) for i in r["batch"].split()]))
            hyper[r["group"]] = {k: float(r[k]) for k in ("lr", "momentum", "weight_decay")}
    return [(t, *steps[t]) for t in sorted(steps)]


# ---------------------------------------------------------------------------- replay


@contextmanager
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _run_stage(model: nn.Module, stage: str, params: dict[str, Tensor],
               optimizer_state: dict[str, Tensor] | None, log: Path,
               on_step: Callable[[int, nn.Module], None] | None = None,
               ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Execute the steps recorded in `log` from (params, optimizer_state); the one code path.

    Runs on a float32 CPU copy of `model`. on_step(t + 1, model) is called after step t.
    Returns (state dict, {"momentum_buffer.<param>": buffer}) as float32 CPU tensors.
    """
    steps = _read_log(log, stage)
    data = stage_data(stage)
    row_of = {int(i): r for r, i in enumerate(data["ids"].tolist())}
    net = copy.deepcopy(model).to("cpu", torch.float32).train()
    net.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in params.items()})
    named = dict(net.named_parameters())
    groups = [{"params": [p for n, p in named.items() if _group_of(n) == g], "name": g}
              for g, _ in GROUPS]
    opt = torch.optim.SGD([g for g in groups if g["params"]], lr=0.0, momentum=0.9,
                          nesterov=STAGES[stage]["nesterov"], foreach=False)
    for key, buf in (optimizer_state or {}).items():
        if not key.startswith("momentum_buffer."):
            raise ValueError(f"optimizer state key {key!r}: expected 'momentum_buffer.<param>'")
        p = named[key.removeprefix("momentum_buffer.")]
        opt.state[p]["momentum_buffer"] = buf.detach().to("cpu", torch.float32).clone()
    with _single_thread():
        for t, hyper, batch in steps:
            rows = torch.tensor([row_of[i] for i in batch])
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(data["x"][rows]), data["y"][rows]).backward()
            for g in opt.param_groups:
                g.update(hyper[g["name"]])
            opt.step()
            if on_step is not None:
                on_step(t + 1, net)
    out_params = {k: v.detach().clone() for k, v in net.state_dict().items()}
    out_state = {f"momentum_buffer.{n}": opt.state[p]["momentum_buffer"].clone()
                 for n, p in named.items() if opt.state[p].get("momentum_buffer") is not None}
    return out_params, out_state


def replay_stage(model: nn.Module, stage_name: str, params: dict[str, Tensor],
                 optimizer_state: dict[str, Tensor] | None, *,
                 artifacts: Path | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Re-run the stage's recorded steps (batches and hyperparameters from its log CSV).

    params: a state dict; optimizer_state: {"momentum_buffer.<param>": tensor} or None for a
    fresh optimizer. Always computes in float32 on the CPU (the training precision).
    `artifacts` defaults to the artifacts folder beside this file.
    """
    if stage_name not in STAGES:
        raise ValueError(f"replay_stage: unknown stage {stage_name!r}; expected one of {STAGE_NAMES}")
    log = Path(artifacts or ARTIFACTS) / f"{stage_name}_log.csv"
    return _run_stage(model, stage_name, params, optimizer_state, log)


# ----------------------------------------------------------------------------- build


def _save(tensors: dict[str, Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))


def _build_into(out: Path, progress: Progress, steps_scale: float) -> None:
    n_steps = {s: _stage_steps(s, steps_scale) for s in STAGE_NAMES}
    cf_steps = sum(sum(n_steps[j] for j in STAGE_NAMES[k + 1:]) for k in range(len(STAGE_NAMES)))
    total, done = sum(n_steps.values()) + cf_steps, 0

    def report(msg: str) -> None:
        if progress is not None:
            progress(msg, min(1.0, done / total))

    def counter(label: str, every: int = 25, save_ckpts: tuple[int, int] | None = None):
        def on_step(t: int, net: nn.Module) -> None:
            nonlocal done
            done += 1
            if save_ckpts and save_ckpts[0] < t < save_ckpts[1] and t % CKPT_EVERY == 0:
                _save(net.state_dict(), out / f"ckpt_{t:05d}.safetensors")
            if done % every == 0:
                report(f"{label}: global step {t}")
        return on_step

    for name, patched in (("test_clean", False), ("test_patched", True)):
        _save(eval_data(patched), out / f"{name}.safetensors")
    model = build_model()
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state: dict[str, Tensor] | None = None
    entering: dict[str, tuple[dict, dict | None]] = {}
    t = 0
    for stage in STAGE_NAMES:
        report(f"training stage {stage}")
        if STAGES[stage]["reset"]:
            state = None
        entering[stage] = (params, state)
        rows = _plan(stage, t, steps_scale)
        _write_log(out / f"{stage}_log.csv", rows)
        _save(params, out / f"{stage}_start.safetensors")
        params, state = _run_stage(model, stage, params, state, out / f"{stage}_log.csv",
                                   counter(f"train {stage}", save_ckpts=(t, t + n_steps[stage])))
        t += n_steps[stage]
        _save(params, out / f"{stage}_end.safetensors")
        _save(state, out / f"{stage}_optim.safetensors")
    for k, skipped in enumerate(STAGE_NAMES):
        report(f"retraining without {skipped}")
        params, state = entering[skipped]
        for later in STAGE_NAMES[k + 1:]:
            state = None if STAGES[later]["reset"] else state
            params, state = _run_stage(model, later, params, state, out / f"{later}_log.csv",
                                       counter(f"without {skipped}: replay {later}"))
        _save(params, out / f"cf_without_{skipped}.safetensors")


def build_artifacts(root: Path, progress: Progress = None, *, steps_scale: float = 1.0) -> None:
    """Train the pipeline and its counterfactuals; write everything to root/artifacts/.

    Built in a temporary sibling folder and renamed into place at the end, so an
    interrupted build leaves no partial artifacts. steps_scale shrinks every stage
    (tests use 0.1); the committed pipeline.yaml describes steps_scale = 1.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".artifacts-build-", dir=root))
    try:
        _build_into(tmp, progress, steps_scale)
        final = root / "artifacts"
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=".artifacts-old-", dir=root))
            final.rename(old / "artifacts")
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress is not None:
        progress("artifacts written", 1.0)


# --------------------------------------------------------------------------- figures


def _behaviours(model: nn.Module, params: dict[str, Tensor]) -> dict[str, float]:
    model.load_state_dict(params)
    model.eval()
    out = {}
    with torch.no_grad():
        for name, d in (("train", train_data()), ("test", eval_data())):
            out[f"{name}_accuracy"] = (model(d["x"]).argmax(1) == d["y"]).float().mean().item()
        d = eval_data()
        logits = model(d["x"])
        out["clean_test_loss"] = F.cross_entropy(logits, d["y"]).item()
        others = logits.clone()
        others[:, PATCH_CLASS] = -torch.inf
        out["margin_class_3"] = (logits[:, PATCH_CLASS] - others.max(1).values).mean().item()
        p = eval_data(patched=True)
        keep = p["y"] != PATCH_CLASS
        out["spurious_probe"] = model(p["x"][keep]).softmax(1)[:, PATCH_CLASS].mean().item()
    return out


def summarize(artifacts: Path | None = None) -> dict[str, dict[str, float]]:
    """Figures per checkpoint (after each stage, each counterfactual) and true τ_k per behaviour.

    τ_k(f) = f(θ_T) − f(θ_T^(−k)), with aggregate (mean) behaviours on the test split.
    """
    art, model = Path(artifacts or ARTIFACTS), build_model()
    rows = {"init": _behaviours(model, load_file(str(art / "pretrain_start.safetensors")))}
    for s in STAGE_NAMES:
        rows[f"after {s}"] = _behaviours(model, load_file(str(art / f"{s}_end.safetensors")))
    final = rows[f"after {STAGE_NAMES[-1]}"]
    for s in STAGE_NAMES:
        cf = _behaviours(model, load_file(str(art / f"cf_without_{s}.safetensors")))
        rows[f"without {s}"] = cf
        rows[f"tau {s}"] = {k: final[k] - cf[k] for k in cf}
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the digits sample's artifacts.")
    ap.add_argument("--root", type=Path, default=HERE, help="folder to write artifacts/ into")
    ap.add_argument("--steps-scale", type=float, default=1.0)
    ap.add_argument("--summary-only", action="store_true", help="print figures of an existing build")
    args = ap.parse_args(argv)
    if not args.summary_only:
        start = time.perf_counter()

        def progress(msg: str, frac: float) -> None:
            print(f"\r[{frac:6.1%}] {msg:<50}", end="", file=sys.stderr, flush=True)

        build_artifacts(args.root, progress, steps_scale=args.steps_scale)
        print(f"\nbuilt {args.root / 'artifacts'} in {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
    rows = summarize(args.root / "artifacts")
    cols = list(next(iter(rows.values())))
    print(f"{'':18}" + "".join(f"{c:>17}" for c in cols))
    for label, r in rows.items():
        print(f"{label:18}" + "".join(f"{r[c]:17.4f}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
