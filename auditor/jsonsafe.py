"""Small shared helpers for what auditor writes: file digests and JSON-safe values."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AuditorError


def sha256_file(path: Path) -> tuple[str, int]:
    """(hex SHA-256, size in bytes) of a file, read in chunks."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256")
        size = f.tell()
    return digest.hexdigest(), size


def sanitize(obj: Any) -> Any:
    """A JSON-ready copy: non-finite floats become None, numpy scalars/arrays become Python ones."""
    if isinstance(obj, Mapping):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return sanitize(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else None
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    raise AuditorError(f"cannot write a value of type {type(obj).__name__} to results.json", where="results")
