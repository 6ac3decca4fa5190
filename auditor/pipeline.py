"""The pipeline description: YAML → validated dataclasses.

``load_pipeline(path)`` reads the YAML, validates it against
``schemas/pipeline.schema.json`` and resolves paths relative to the YAML file.
``Pipeline.check_files()`` then confirms that every file it names exists, and
``Pipeline.load_schedules()`` validates the per-step logs (pandera) and their
contiguity across stages.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import jsonschema
import yaml

from .errors import AuditorError
from .steplog import StageSchedule, load_stage_log

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / "schemas" / "pipeline.schema.json"


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


@dataclass
class ParamGroup:
    name: str
    patterns: list[str]


@dataclass
class Stage:
    index: int
    name: str
    description: str
    owner: str
    optimizer: str
    nesterov: bool
    reset: bool
    start_checkpoint: Path
    end_checkpoint: Path
    checkpoints: list[tuple[int, Path]]
    optimizer_state: Path | None
    log: Path
    param_groups: list[ParamGroup]
    counterfactual_checkpoint: Path | None

    def group_of(self, param: str) -> str | None:
        """The first group whose pattern matches ``param`` (fnmatch), or None."""
        for g in self.param_groups:
            if any(fnmatch.fnmatchcase(param, p) for p in g.patterns):
                return g.name
        return None


@dataclass
class Behavior:
    name: str
    description: str
    kind: str
    data: dict
    cls: int | None = None
    callable: str | None = None
    subset: dict | None = None
    aggregate: str = "mean"
    differentiable: bool = True
    image_shape: tuple[int, ...] | None = None


@dataclass
class Pipeline:
    path: Path
    root: Path
    raw: dict
    system: dict
    model_factory: str
    model_kwargs: dict
    build_factory: str | None
    stages: list[Stage]
    behaviors: list[Behavior]
    reviewers: list[dict] = field(default_factory=list)
    policy: list[dict] = field(default_factory=list)
    training: dict | None = None
    seeds: dict = field(default_factory=dict)

    # ---- files ---------------------------------------------------------------------------
    def referenced_files(self) -> list[tuple[str, Path]]:
        """(field path, file) for every file the description names."""
        out: list[tuple[str, Path]] = []
        for i, s in enumerate(self.stages):
            pre = f"stages[{i}]"
            out += [(f"{pre}.start_checkpoint", s.start_checkpoint), (f"{pre}.end_checkpoint", s.end_checkpoint),
                    (f"{pre}.log", s.log)]
            out += [(f"{pre}.checkpoints[{j}].path", p) for j, (_, p) in enumerate(s.checkpoints)]
            if s.optimizer_state:
                out.append((f"{pre}.optimizer_state", s.optimizer_state))
            if s.counterfactual_checkpoint:
                out.append((f"{pre}.counterfactual_checkpoint", s.counterfactual_checkpoint))
        for i, b in enumerate(self.behaviors):
            if "file" in b.data:
                out.append((f"behaviors[{i}].data.file", b.data["file"]))
        return out

    def missing_files(self, truth: bool = True) -> list[tuple[str, Path]]:
        """(field, path) of every named file that does not exist (``truth=False``: not counting the
        counterfactual checkpoints, which retraining replaces)."""
        return [(f, p) for f, p in self.referenced_files()
                if not p.is_file() and (truth or not f.endswith("counterfactual_checkpoint"))]

    def check_files(self, truth: bool = True) -> None:
        missing = self.missing_files(truth)
        if missing:
            fld, p = missing[0]
            what = "is a directory" if p.is_dir() else "file not found"
            hint = ""
            if self.build_factory and len(missing) == len(self.referenced_files()):
                hint = " (run `auditor build` to build this sample's artifacts)"
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise AuditorError(f"{what}: {p}{more}{hint}", where=f"{self.path}: {fld}")

    def ensure_artifacts(self, progress: Callable[[str, float], None] | None = None) -> bool:
        """Build the artifacts with the YAML's ``build.factory`` when none of them exists (a fresh
        sample). When only some are missing nothing is built — a rebuild would overwrite the
        others — and the first missing one is reported. Returns True if it built."""
        missing = self.missing_files()
        if not missing:
            return False
        if not self.build_factory or len(missing) != len(self.referenced_files()):
            self.check_files()
        fn = self.resolve(self.build_factory, "build.factory")
        call_user(fn, f"{self.path}: build.factory", self.root, progress)
        self.check_files()
        return True

    # ---- code ----------------------------------------------------------------------------
    def resolve(self, spec: str, fld: str) -> Callable:
        return resolve_callable(spec, self.root, where=f"{self.path}: {fld}")

    def build_model(self):
        import torch

        fn = self.resolve(self.model_factory, "model.factory")
        model = call_user(fn, f"{self.path}: model.factory", **self.model_kwargs)
        if not isinstance(model, torch.nn.Module):
            raise AuditorError(f"{self.model_factory} returned {type(model).__name__}; expected a torch.nn.Module",
                               where=f"{self.path}: model.factory")
        return model.eval()

    # ---- schedules -----------------------------------------------------------------------
    def load_schedules(self, param_names: list[str] | None = None) -> list[StageSchedule]:
        """Validate every stage's log and return the schedules; stage k+1 must start where k ended."""
        out: list[StageSchedule] = []
        next_step = 0
        for s in self.stages:
            sched = load_stage_log(s.log, stage=s.name, optimizer=s.optimizer, nesterov=s.nesterov, reset=s.reset,
                                   groups=[g.name for g in s.param_groups], first_step=next_step)
            next_step = sched.end_step
            raw_ck = self.raw["stages"][s.index].get("checkpoints", [])
            for j, c in enumerate(raw_ck):
                if not sched.first_step <= int(c["step"]) <= sched.end_step:
                    raise AuditorError(f"step {c['step']} lies outside the stage's steps "
                                       f"[{sched.first_step}, {sched.end_step}]",
                                       where=f"{self.path}: stages[{s.index}].checkpoints[{j}].step")
            if param_names is not None:
                for p in param_names:
                    g = s.group_of(p)
                    if g is None:
                        pats = "; ".join(f"{g.name}: {g.patterns}" for g in s.param_groups)
                        raise AuditorError(f"parameter {p!r} matches no parameter group ({pats}); add a pattern "
                                           f"such as '*' to a group", where=f"{self.path}: stages[{s.index}].param_groups")
                    sched.param_group[p] = g
            out.append(sched)
        return out


def call_user(fn: Callable, where: str, *args, **kwargs):
    """Call user code (a factory, callable or replay entry point): whatever it raises — an exception
    or even SystemExit — becomes a one-line AuditorError naming the YAML field."""
    try:
        return fn(*args, **kwargs)
    except AuditorError:
        raise
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code may raise anything
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise AuditorError(f"{getattr(fn, '__name__', fn)} raised {exc.__class__.__name__}: {first[:200]}",
                           where=where) from None


def resolve_callable(spec: str, root: Path, *, where: str) -> Callable:
    """Import ``module:function`` with ``root`` first on sys.path."""
    module, _, name = spec.partition(":")
    with _on_path(root):
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            raise AuditorError(f"cannot import module {module!r} ({exc}); expected a module importable from "
                               f"{root} or installed", where=where) from None
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - a module that fails while importing
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise AuditorError(f"importing module {module!r} raised {exc.__class__.__name__}: {first[:200]}",
                               where=where) from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise AuditorError(f"module {module!r} has no callable {name!r}", where=where)
    return fn


@contextlib.contextmanager
def _on_path(root: Path):
    entry = str(root)
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(entry)


def _checkpoint_list(items: list[dict], rel, where: str) -> list[tuple[int, Path]]:
    seen: dict[int, int] = {}
    for j, c in enumerate(items):
        if int(c["step"]) in seen:
            raise AuditorError(f"step {c['step']} is listed twice (also checkpoints[{seen[int(c['step'])]}]); "
                               "expected one checkpoint per step", where=f"{where}[{j}].step")
        seen[int(c["step"])] = j
    return sorted((int(c["step"]), rel(c["path"])) for c in items)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, but a mapping that repeats a key is an error (the last one would silently win)."""

    def construct_mapping(self, node, deep=False):
        keys = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in keys:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            keys.add(key)
        return super().construct_mapping(node, deep)


def _schema_message(err: jsonschema.ValidationError) -> tuple[str, str]:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path).lstrip(".") or "(top level)"
    if err.validator == "required":
        missing = err.message.split("'")[1] if "'" in err.message else err.message
        return (f"{path}.{missing}" if path != "(top level)" else missing), "required field is missing"
    if err.validator == "additionalProperties":
        return path, f"{err.message}; see `auditor schema` for the allowed fields"
    if err.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum", "const", "type",
                         "pattern", "minItems", "maxItems", "minLength"):
        return path, f"{err.instance!r} is invalid: {err.message}"
    if err.validator in ("oneOf", "anyOf"):
        return path, f"{err.message.split(' is not valid')[0][:80]} does not match any allowed form ({err.validator}); " \
                     "see `auditor schema`"
    return path, err.message


def load_pipeline(path: str | Path) -> Pipeline:
    """Read and validate a pipeline YAML. Raises AuditorError with a one-line message on bad input."""
    path = Path(path)
    if path.is_dir():
        raise AuditorError("is a directory; expected a pipeline YAML file", where=str(path))
    if not path.is_file():
        raise AuditorError("file not found (expected a pipeline YAML)", where=str(path))
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        at = f" (line {line + 1})" if line is not None else ""
        raise AuditorError(f"not valid YAML{at}: {getattr(exc, 'problem', None) or exc}", where=str(path)) from None
    if not isinstance(raw, dict):
        raise AuditorError("expected a mapping at the top level", where=str(path))
    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(raw), key=lambda e: (len(list(e.absolute_path)), list(map(str, e.absolute_path))))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        fld, msg = _schema_message(best)
        raise AuditorError(msg, where=f"{path}: {fld}")
    root = path.resolve().parent
    rel = lambda p: (root / p).resolve()  # noqa: E731

    stages: list[Stage] = []
    names: set[str] = set()
    for i, s in enumerate(raw["stages"]):
        where = f"{path}: stages[{i}]"
        if s["name"] in names:
            raise AuditorError(f"stage name {s['name']!r} is used twice; expected unique names", where=f"{where}.name")
        names.add(s["name"])
        kind = s["optimizer"]["kind"]
        if i == 0 and not s["reset"]:
            raise AuditorError("the first stage has no previous optimizer state to carry; expected reset: true",
                               where=f"{where}.reset")
        if i > 0 and not s["reset"] and stages[-1].optimizer != kind:
            raise AuditorError(f"carries the optimizer state of a {stages[-1].optimizer} stage into a {kind} stage; "
                               "expected reset: true when the optimizer kind changes", where=f"{where}.reset")
        if s["optimizer"].get("nesterov") and kind != "sgd":
            raise AuditorError("nesterov applies to sgd only", where=f"{where}.optimizer.nesterov")
        gnames = [g["name"] for g in s["param_groups"]]
        if len(set(gnames)) != len(gnames):
            raise AuditorError("parameter group names repeat; expected unique names", where=f"{where}.param_groups")
        stages.append(Stage(
            index=i, name=s["name"], description=s.get("description", ""), owner=s["owner"], optimizer=kind,
            nesterov=bool(s["optimizer"].get("nesterov", False)), reset=bool(s["reset"]),
            start_checkpoint=rel(s["start_checkpoint"]), end_checkpoint=rel(s["end_checkpoint"]),
            checkpoints=_checkpoint_list(s.get("checkpoints", []), rel, f"{where}.checkpoints"),
            optimizer_state=rel(s["optimizer_state"]) if s.get("optimizer_state") else None,
            log=rel(s["log"]),
            param_groups=[ParamGroup(g["name"], list(g["params"])) for g in s["param_groups"]],
            counterfactual_checkpoint=rel(s["counterfactual_checkpoint"]) if s.get("counterfactual_checkpoint") else None,
        ))
    # A carried SGD state needs the previous stage's saved state (δm at the boundary).
    for k in range(1, len(stages)):
        prev, cur = stages[k - 1], stages[k]
        if not cur.reset and prev.optimizer == "sgd" and prev.optimizer_state is None:
            raise AuditorError(f"stage {cur.name!r} carries the optimizer state, so the state at the end of "
                               f"{prev.name!r} is needed; expected optimizer_state", where=f"{path}: stages[{k - 1}].optimizer_state")

    behaviors: list[Behavior] = []
    bnames: set[str] = set()
    for i, b in enumerate(raw["behaviors"]):
        if b["name"] in bnames:
            raise AuditorError(f"behavior name {b['name']!r} is used twice; expected unique names",
                               where=f"{path}: behaviors[{i}].name")
        bnames.add(b["name"])
        data = dict(b["data"])
        if "file" in data:
            data["file"] = rel(data["file"])
        diff = b.get("differentiable", b["kind"] != "accuracy")
        if b["kind"] == "accuracy" and diff:
            raise AuditorError("accuracy is not differentiable; expected differentiable: false or no field",
                               where=f"{path}: behaviors[{i}].differentiable")
        behaviors.append(Behavior(
            name=b["name"], description=b.get("description", ""), kind=b["kind"], data=data, cls=b.get("class"),
            callable=b.get("callable"), subset=b.get("subset"), aggregate=b.get("aggregate", "mean"),
            differentiable=diff, image_shape=tuple(data["image_shape"]) if "image_shape" in data else None,
        ))

    gate_ids: set[str] = set()
    for i, g in enumerate(raw.get("policy", [])):
        if g["id"] in gate_ids:
            raise AuditorError(f"gate id {g['id']!r} is used twice; expected unique ids", where=f"{path}: policy[{i}].id")
        gate_ids.add(g["id"])
        if g["behavior"] not in bnames:
            raise AuditorError(f"names behavior {g['behavior']!r}, which is not defined (behaviors: "
                               f"{', '.join(sorted(bnames))})", where=f"{path}: policy[{i}].behavior")
        if g["rule"] == "stage_effect" and g.get("stage") not in names:
            raise AuditorError(f"rule stage_effect needs a stage among {', '.join(sorted(names))}; found {g.get('stage')!r}",
                               where=f"{path}: policy[{i}].stage")
        if "min" in g and "max" in g and g["min"] > g["max"]:
            raise AuditorError(f"min {g['min']} is greater than max {g['max']}", where=f"{path}: policy[{i}]")

    return Pipeline(
        path=path, root=root, raw=raw, system=dict(raw["system"]),
        model_factory=raw["model"]["factory"], model_kwargs=dict(raw["model"].get("kwargs", {})),
        build_factory=(raw.get("build") or {}).get("factory"), stages=stages, behaviors=behaviors,
        reviewers=list(raw.get("reviewers", [])), policy=list(raw.get("policy", [])),
        training=raw.get("training"), seeds=dict(raw.get("seeds", {})),
    )

