"""Per-step training logs: loading, pandera validation, and the schedule they describe.

A log has one row per (step, parameter group); see docs/DESIGN.md for the columns.
The loaded form is a :class:`StageSchedule`: hyperparameter arrays of shape
[n_steps, n_groups], rows in step order, columns in the stage's group order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa

from .errors import AuditorError

SGD_COLUMNS = ("lr", "momentum", "weight_decay")
ADAM_COLUMNS = ("beta1", "beta2", "eps")


@dataclass
class StageSchedule:
    """The recorded optimizer steps of one stage.

    lr, momentum, weight_decay (and beta1, beta2, eps for AdamW): float64 [n_steps, n_groups].
    batches: per step, the ids of the minibatch examples (None when the log has no batch column).
    """

    stage: str
    optimizer: str
    nesterov: bool
    reset: bool
    first_step: int
    groups: list[str]
    lr: np.ndarray
    momentum: np.ndarray
    weight_decay: np.ndarray
    beta1: np.ndarray | None = None
    beta2: np.ndarray | None = None
    eps: np.ndarray | None = None
    batches: list[list[int]] | None = None
    param_group: dict[str, str] = field(default_factory=dict)

    @property
    def n_steps(self) -> int:
        return int(self.lr.shape[0])

    @property
    def end_step(self) -> int:
        return self.first_step + self.n_steps

    def group_index(self, group: str) -> int:
        return self.groups.index(group)


def _row_schema(optimizer: str) -> pa.DataFrameSchema:
    finite = [pa.Check(lambda s: np.isfinite(s.astype(float)), error="finite (no NaN or inf)")]
    cols = {
        "step": pa.Column(int, pa.Check.ge(0), nullable=False),
        "stage": pa.Column(str, nullable=False),
        "group": pa.Column(str, nullable=False),
        "lr": pa.Column(float, [pa.Check.ge(0), *finite], nullable=False, coerce=True),
        "momentum": pa.Column(float, [pa.Check.ge(0), pa.Check.lt(1), *finite], nullable=False, coerce=True),
        "weight_decay": pa.Column(float, [pa.Check.ge(0), *finite], nullable=False, coerce=True),
    }
    if optimizer == "adamw":
        cols["beta1"] = pa.Column(float, [pa.Check.ge(0), pa.Check.lt(1), *finite], nullable=False, coerce=True)
        cols["beta2"] = pa.Column(float, [pa.Check.ge(0), pa.Check.lt(1), *finite], nullable=False, coerce=True)
        cols["eps"] = pa.Column(float, [pa.Check.gt(0), *finite], nullable=False, coerce=True)
    return pa.DataFrameSchema(cols, strict=False, coerce=True)


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise AuditorError("file not found (expected the stage's per-step log, CSV or Parquet)", where=str(path))
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path, dtype={"batch": str, "stage": str, "group": str}, keep_default_na=False,
                           na_values={c: ["", "nan", "NaN"] for c in (*SGD_COLUMNS, *ADAM_COLUMNS)})
    except (ValueError, OSError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise AuditorError(f"cannot read the per-step log ({exc.__class__.__name__}: {first[:160]}); expected a CSV "
                           "or Parquet table", where=str(path)) from None


def load_stage_log(path: Path, *, stage: str, optimizer: str, nesterov: bool, reset: bool,
                   groups: list[str], first_step: int | None = None) -> StageSchedule:
    """Load and validate one stage's log.

    Checks (pandera + structure): required columns present, lr ≥ 0, 0 ≤ momentum < 1,
    weight decay ≥ 0, no NaN; every row names this stage; the steps are contiguous and
    increasing (starting at ``first_step`` when given), each with exactly one row per group.
    """
    where = str(path)
    df = _read_table(path)
    required = ["step", "stage", "group", *SGD_COLUMNS] + (list(ADAM_COLUMNS) if optimizer == "adamw" else [])
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise AuditorError(f"missing column(s) {', '.join(missing)}; expected {', '.join(required)}", where=where)
    if len(df) == 0:
        raise AuditorError("the log has no rows; expected one row per (step, parameter group)", where=where)
    step_num = pd.to_numeric(df["step"], errors="coerce")
    bad = step_num.isna() | (step_num != step_num.round())
    if bad.any():
        i = int(np.argmax(bad.to_numpy()))
        raise AuditorError(f"column 'step' has value {df['step'].iloc[i]!r} at row {i + 2}; expected integer "
                           "step indices", where=where)
    df["step"] = step_num.astype("int64")
    try:
        df = _row_schema(optimizer).validate(df, lazy=False)
    except (pa.errors.SchemaError, pa.errors.SchemaErrors) as exc:
        raise AuditorError(_describe_schema_error(exc), where=where) from None

    bad_stage = sorted(set(df["stage"]) - {stage})
    if bad_stage:
        raise AuditorError(f"column 'stage' holds {bad_stage[0]!r}; expected only {stage!r}", where=where)
    unknown = sorted(set(df["group"]) - set(groups))
    if unknown:
        raise AuditorError(f"column 'group' holds {unknown[0]!r}, which is not a parameter group of stage "
                           f"{stage!r} (groups: {', '.join(groups)})", where=where)

    steps = df["step"].to_numpy()
    if np.any(np.diff(steps) < 0):
        i = int(np.argmax(np.diff(steps) < 0))
        raise AuditorError(f"column 'step' decreases at row {i + 2} ({steps[i]} then {steps[i + 1]}); "
                           "expected increasing steps", where=where)
    uniq = np.unique(steps)
    start = int(uniq[0])
    if first_step is not None and start != first_step:
        raise AuditorError(f"column 'step' starts at {start}; expected {first_step} (the previous stage ended "
                           f"there: stages must be contiguous)", where=where)
    gaps = np.nonzero(np.diff(uniq) != 1)[0]
    if len(gaps):
        g = int(gaps[0])
        raise AuditorError(f"column 'step' is not contiguous: {uniq[g]} is followed by {uniq[g + 1]}; "
                           "expected consecutive steps", where=where)
    counts = df.groupby("step")["group"].agg(lambda s: sorted(s))
    for step, gs in counts.items():
        if gs != sorted(groups):
            raise AuditorError(f"step {step} has rows for groups {gs}; expected exactly one row for each of "
                               f"{sorted(groups)}", where=where)

    n = len(uniq)
    order = df.sort_values(["step", "group"], kind="stable")

    def arr(col: str) -> np.ndarray:
        out = np.zeros((n, len(groups)))
        for j, g in enumerate(groups):
            out[:, j] = order.loc[order["group"] == g, col].to_numpy(dtype=float)
        return out

    batches = None
    if "batch" in df.columns:
        per_step: dict[int, list[int]] = {}
        for step, text in zip(order["step"], order["batch"]):
            try:
                ids = [int(tok) for tok in str(text).split()]
            except ValueError:
                raise AuditorError(f"column 'batch' at step {step} is {str(text)[:40]!r}; expected "
                                   "space-separated integer example ids", where=where) from None
            if not ids:
                raise AuditorError(f"column 'batch' at step {step} is empty; expected the ids of the step's "
                                   "examples", where=where)
            if per_step.setdefault(int(step), ids) != ids:
                raise AuditorError(f"column 'batch' differs between the parameter groups of step {step}; "
                                   "expected the same minibatch on every row of a step", where=where)
        batches = [per_step[int(t)] for t in uniq]
    return StageSchedule(
        stage=stage, optimizer=optimizer, nesterov=nesterov, reset=reset, first_step=start, groups=list(groups),
        lr=arr("lr"), momentum=arr("momentum"), weight_decay=arr("weight_decay"),
        beta1=arr("beta1") if optimizer == "adamw" else None,
        beta2=arr("beta2") if optimizer == "adamw" else None,
        eps=arr("eps") if optimizer == "adamw" else None,
        batches=batches,
    )


_CHECK_WORDS = {
    "greater_than_or_equal_to": "a value >= its lower bound (lr >= 0, weight_decay >= 0, momentum >= 0)",
    "less_than": "a value < 1 (0 <= momentum < 1, betas < 1)",
    "greater_than": "a value > 0",
    "not_nullable": "a number (no NaN or empty cells)",
    "coerce_dtype('int64')": "an integer",
    "coerce_dtype('float64')": "a number",
}


def _describe_schema_error(exc: Exception) -> str:
    """One line from a pandera error: column, check and a failing value."""
    fc = getattr(exc, "failure_cases", None)
    column = getattr(getattr(exc, "schema", None), "name", None) or getattr(exc, "column_name", None)
    check = getattr(exc, "check", None)
    if fc is not None and len(fc):
        row = fc.iloc[0]
        value = row.get("failure_case") if hasattr(row, "get") else row
        idx = row.get("index") if hasattr(row, "get") else None
        col = column or (row.get("column") if hasattr(row, "get") else None)
        if isinstance(value, np.generic):
            value = value.item()
        at = f" at row {int(idx) + 2}" if isinstance(idx, (int, np.integer)) else ""
        name = getattr(check, "name", check)
        words = _CHECK_WORDS.get(name, getattr(check, "error", None) or name)
        chk = f"; expected {words}" if check is not None else ""
        return f"column {col!r} has value {value!r}{at}{chk}"
    return str(exc).splitlines()[0]
