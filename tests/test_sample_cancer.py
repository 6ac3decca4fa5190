"""The breast-cancer sample pipeline (samples/breast_cancer/): replay, determinism, logs, YAML."""

from __future__ import annotations

import csv
import fnmatch
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "breast_cancer"
SCALE = 0.2  # tiny variant: 30 + 25 + 25 + 10 steps


def _load_module():
    name = "cancer_pipeline"
    if name in sys.modules and Path(sys.modules[name].__file__).resolve() == SAMPLE / "cancer_pipeline.py":
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SAMPLE / "cancer_pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


cp = _load_module()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cancer")
    calls = []
    cp.build_artifacts(root, progress=lambda msg, frac: calls.append((msg, frac)), steps_scale=SCALE)
    return root / "artifacts", calls


@pytest.fixture(scope="module")
def yaml_doc():
    return yaml.safe_load((SAMPLE / "pipeline.yaml").read_text())


def _read_log(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_tensors(a: dict, b: dict, what: str):
    assert sorted(a) == sorted(b), what
    for k in a:
        assert a[k].dtype == b[k].dtype, f"{what}: {k} dtype"
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs (max {float((a[k] - b[k]).abs().max())})"


# --------------------------------------------------------------------------- replay

@pytest.mark.parametrize("k", range(4))
def test_replay_reproduces_stage_end_exactly(built, k):
    art, _ = built
    spec = cp.STAGES[k]
    params = load_file(str(art / f"{spec.name}_start.safetensors"))
    state = None if spec.reset else cp.load_optimizer_state(art / f"{cp.STAGES[k - 1].name}_optim.safetensors")
    if not spec.reset:
        assert spec.name == "refine" and state["step"] > 0 and any(k.startswith("exp_avg.") for k in state)
    new_params, new_state = cp.replay_stage(cp.build_model(), spec.name, params, state, artifacts=art)
    _assert_same_tensors(new_params, load_file(str(art / f"{spec.name}_end.safetensors")), f"{spec.name} end")
    saved = cp.load_optimizer_state(art / f"{spec.name}_optim.safetensors")
    _assert_same_tensors(new_state, saved, f"{spec.name} optimizer state")


def test_carry_matters(built):
    """Replaying the carry stage with a fresh optimizer must NOT reproduce its end (the state is used)."""
    art, _ = built
    params = load_file(str(art / "refine_start.safetensors"))
    fresh, _ = cp.replay_stage(cp.build_model(), "refine", params, None, artifacts=art)
    end = load_file(str(art / "refine_end.safetensors"))
    assert any(not torch.equal(fresh[k], end[k]) for k in end)


def test_replay_does_not_mutate_inputs_and_keeps_threads(built):
    art, _ = built
    params = load_file(str(art / "refine_start.safetensors"))
    state = cp.load_optimizer_state(art / "shift_finetune_optim.safetensors")
    p0 = {k: v.clone() for k, v in params.items()}
    s0 = {k: v.clone() for k, v in state.items()}
    threads = torch.get_num_threads()
    cp.replay_stage(cp.build_model(), "refine", params, state, artifacts=art)
    _assert_same_tensors(params, p0, "params input")
    _assert_same_tensors(state, s0, "optimizer state input")
    assert torch.get_num_threads() == threads


def test_replay_float64_model_runs_in_float64(built):
    art, _ = built
    params = load_file(str(art / "calibrate_start.safetensors"))
    out, state = cp.replay_stage(cp.build_model().double(), "calibrate", params, None, artifacts=art)
    end = load_file(str(art / "calibrate_end.safetensors"))
    for k in end:
        assert out[k].dtype == torch.float64
        torch.testing.assert_close(out[k].float(), end[k], atol=1e-4, rtol=1e-4)


def test_counterfactuals_are_retraining(built):
    art, _ = built
    model = cp.build_model()
    last = cp.STAGES[-1].name
    _assert_same_tensors(load_file(str(art / f"cf_without_{last}.safetensors")),
                         load_file(str(art / f"{last}_start.safetensors")), "cf without the last stage")
    # Without shift_finetune (a reset stage): refine carries, so it gets the state entering
    # shift_finetune, which is fresh; calibrate resets.
    p = load_file(str(art / "shift_finetune_start.safetensors"))
    p, s = cp.replay_stage(model, "refine", p, None, artifacts=art)
    p, s = cp.replay_stage(model, "calibrate", p, None, artifacts=art)
    _assert_same_tensors(p, load_file(str(art / "cf_without_shift_finetune.safetensors")), "cf without shift")
    # Without refine: calibrate (reset) from refine's start.
    p = load_file(str(art / "refine_start.safetensors"))
    p, _ = cp.replay_stage(model, "calibrate", p, None, artifacts=art)
    _assert_same_tensors(p, load_file(str(art / "cf_without_refine.safetensors")), "cf without refine")
    # Without pretrain: start from the initialisation, every later stage replayed.
    p = load_file(str(art / "pretrain_start.safetensors"))
    s = None
    for spec in cp.STAGES[1:]:
        p, s = cp.replay_stage(model, spec.name, p, None if spec.reset else s, artifacts=art)
    _assert_same_tensors(p, load_file(str(art / "cf_without_pretrain.safetensors")), "cf without pretrain")
    # And each counterfactual differs from the factual final model.
    final = load_file(str(art / f"{last}_end.safetensors"))
    for spec in cp.STAGES:
        cf = load_file(str(art / f"cf_without_{spec.name}.safetensors"))
        assert any(not torch.equal(cf[k], final[k]) for k in final), spec.name


# --------------------------------------------------------------------------- build

def test_deterministic_build(built, tmp_path):
    art, _ = built
    cp.build_artifacts(tmp_path, steps_scale=SCALE)
    a = sorted(p.name for p in art.iterdir())
    b = sorted(p.name for p in (tmp_path / "artifacts").iterdir())
    assert a == b
    for name in a:
        assert (art / name).read_bytes() == (tmp_path / "artifacts" / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts"]  # no temp folders left


def test_build_files_and_progress(built):
    art, calls = built
    plan = cp.checkpoint_plan(SCALE)
    expected = {"test.safetensors", "test_shifted.safetensors"}
    for p in plan:
        n = p["name"]
        expected |= {f"{n}_start.safetensors", f"{n}_end.safetensors", f"{n}_optim.safetensors",
                     f"{n}_log.csv", f"cf_without_{n}.safetensors"}
        expected |= {f"ckpt_{s:05d}.safetensors" for s in p["checkpoints"]}
    assert {p.name for p in art.iterdir()} == expected
    assert any(p["checkpoints"] for p in plan)
    fracs = [f for _, f in calls]
    assert fracs[0] == 0.0 and fracs[-1] == 1.0 and fracs == sorted(fracs)
    # Stage boundaries chain: each start equals the previous end.
    for a, b in zip(plan, plan[1:]):
        _assert_same_tensors(load_file(str(art / f"{a['name']}_end.safetensors")),
                             load_file(str(art / f"{b['name']}_start.safetensors")), "boundary")
    # Checkpoint metadata carries the global step.
    for p in plan:
        for s in p["checkpoints"]:
            with safe_open(str(art / f"ckpt_{s:05d}.safetensors"), framework="pt") as f:
                assert f.metadata()["global_step"] == str(s)


def test_optimizer_state_files(built):
    art, _ = built
    names = [n for n, _ in cp.build_model().named_parameters()]
    total = 0
    for p in cp.checkpoint_plan(SCALE):
        total = total + p["n_steps"] if not cp.STAGES[[s.name for s in cp.STAGES].index(p["name"])].reset \
            else p["n_steps"]
        path = art / f"{p['name']}_optim.safetensors"
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            meta = f.metadata()
        assert keys == {f"exp_avg.{n}" for n in names} | {f"exp_avg_sq.{n}" for n in names}
        assert int(meta["step"]) == total, p["name"]  # refine continues shift_finetune's count


def test_evaluation_sets(built):
    art, _ = built
    clean = load_file(str(art / "test.safetensors"))
    shifted = load_file(str(art / "test_shifted.safetensors"))
    assert clean["x"].shape == (114, 30) and clean["x"].dtype == torch.float32
    assert clean["y"].dtype == torch.int64 and clean["ids"].dtype == torch.int64
    assert torch.equal(clean["y"], shifted["y"]) and torch.equal(clean["ids"], shifted["ids"])
    names = cp._dataset()["feature_names"]
    changed = (clean["x"] != shifted["x"]).any(0)
    expect = torch.tensor([("radius" in n or "perimeter" in n or "area" in n or n in ("mean texture", "worst texture"))
                           for n in names])
    assert torch.equal(changed, expect)
    # Both classes present; 0 = malignant in sklearn's encoding.
    assert set(clean["y"].tolist()) == {0, 1}
    from sklearn.datasets import load_breast_cancer
    assert load_breast_cancer().target_names[cp.MALIGNANT] == "malignant"


def test_stage_data_disjoint_ids():
    ids = {s.name: cp.stage_data(s.name)["ids"] for s in cp.STAGES}
    test_ids = set(cp.test_data()["ids"].tolist())
    for name, v in ids.items():
        assert len(set(v.tolist())) == len(v), name
        assert not set(v.tolist()) & test_ids, name
        d = cp.stage_data(name)
        assert d["x"].dtype == torch.float32 and d["x"].shape == (len(v), 30) and d["y"].dtype == torch.int64
    assert not set(ids["pretrain"].tolist()) & set(ids["shift_finetune"].tolist())
    assert not set(ids["calibrate"].tolist()) & (set(ids["pretrain"].tolist()) | set(ids["refine"].tolist()))
    # refine mixes clean and Site-B (drifted) cases
    assert set(ids["refine"].tolist()) & set(ids["shift_finetune"].tolist())


# --------------------------------------------------------------------------- logs

def test_log_structure(built):
    art, _ = built
    groups = [g for g, _ in cp.PARAM_GROUPS]
    expected_step = 0
    for spec, p in zip(cp.STAGES, cp.checkpoint_plan(SCALE)):
        rows = _read_log(art / f"{spec.name}_log.csv")
        assert list(rows[0].keys()) == ["step", "stage", "group", "lr", "momentum", "weight_decay",
                                        "beta1", "beta2", "eps", "batch"]
        assert len(rows) == p["n_steps"] * len(groups)
        steps = sorted({int(r["step"]) for r in rows})
        assert steps == list(range(expected_step, expected_step + p["n_steps"])), spec.name
        expected_step += p["n_steps"]
        ids = set(cp.stage_data(spec.name)["ids"].tolist())
        by_step: dict[int, list[dict]] = {}
        for r in rows:
            by_step.setdefault(int(r["step"]), []).append(r)
        for t, rs in by_step.items():
            assert sorted(r["group"] for r in rs) == sorted(groups), t
            assert len({r["batch"] for r in rs}) == 1
            batch = [int(v) for v in rs[0]["batch"].split()]
            assert len(batch) == cp.BATCH_SIZE and set(batch) <= ids
            for r in rs:
                assert r["stage"] == spec.name
                assert float(r["momentum"]) == 0.0
                assert float(r["lr"]) > 0
                assert (float(r["beta1"]), float(r["beta2"]), float(r["eps"])) == (*spec.betas, spec.eps)
                wd = float(r["weight_decay"])
                assert wd == (spec.weight_decay if r["group"] == "decay" else 0.0)
        lrs = [float(by_step[t][0]["lr"]) for t in steps]
        peak = max(lrs)
        assert peak == pytest.approx(spec.lr) and lrs[-1] < peak  # warmup to the peak, then decay


def test_log_passes_auditor_loader_if_present(built):
    steplog = pytest.importorskip("auditor.steplog")
    if not hasattr(steplog, "load_stage_log"):
        pytest.skip("auditor.steplog.load_stage_log not available")
    art, _ = built
    groups = [g for g, _ in cp.PARAM_GROUPS]
    for spec, p in zip(cp.STAGES, cp.checkpoint_plan(SCALE)):
        sched = steplog.load_stage_log(art / f"{spec.name}_log.csv", stage=spec.name, optimizer="adamw",
                                       nesterov=False, reset=spec.reset, groups=groups,
                                       first_step=p["first_step"])
        assert sched.n_steps == p["n_steps"]


# --------------------------------------------------------------------------- YAML

def test_param_groups_partition_parameters(yaml_doc):
    names = [n for n, _ in cp.build_model(**yaml_doc["model"]["kwargs"]).named_parameters()]
    assert len(names) == 12
    for stage in yaml_doc["stages"]:
        groups = stage["param_groups"]
        assert [g["name"] for g in groups] == [g for g, _ in cp.PARAM_GROUPS]
        assert [g["params"] for g in groups] == [pats for _, pats in cp.PARAM_GROUPS]
        for n in names:
            hits = [(g["name"], pat) for g in groups for pat in g["params"] if fnmatch.fnmatchcase(n, pat)]
            assert len(hits) == 1, f"{stage['name']}: {n} matches {hits}"
            expect = "no_decay" if (n.endswith(".bias") or "norm" in n) else "decay"
            assert hits[0][0] == expect, n
            assert cp.param_group_of(n) == expect


def test_yaml_matches_code(yaml_doc):
    d = yaml_doc
    assert d["format"] == 1 and d["system"]["name"] == "tumour-triage-classifier"
    assert d["model"]["factory"] == "cancer_pipeline:build_model"
    assert d["build"]["factory"] == "cancer_pipeline:build_artifacts"
    assert d["training"] == {"data": "cancer_pipeline:stage_data", "loss": "cross_entropy",
                             "replay": "cancer_pipeline:replay_stage"}
    plan = cp.checkpoint_plan()
    assert [s["name"] for s in d["stages"]] == [p["name"] for p in plan]
    for st, spec, p in zip(d["stages"], cp.STAGES, plan):
        n = spec.name
        assert st["reset"] is spec.reset and st["optimizer"]["kind"] == "adamw"
        assert st["owner"] and st["description"]
        assert st["start_checkpoint"] == f"artifacts/{n}_start.safetensors"
        assert st["end_checkpoint"] == f"artifacts/{n}_end.safetensors"
        assert st["optimizer_state"] == f"artifacts/{n}_optim.safetensors"
        assert st["log"] == f"artifacts/{n}_log.csv"
        assert st["counterfactual_checkpoint"] == f"artifacts/cf_without_{n}.safetensors"
        assert st.get("checkpoints", []) == [{"step": s, "path": f"artifacts/ckpt_{s:05d}.safetensors"}
                                            for s in p["checkpoints"]]
    assert [s["reset"] for s in d["stages"]] == [True, True, False, True]
    beh = {b["name"]: b for b in d["behaviors"]}
    assert set(beh) == {"test_loss", "test_accuracy", "shifted_test_loss", "malignant_prob"}
    assert beh["malignant_prob"]["class"] == cp.MALIGNANT and beh["malignant_prob"]["subset"] == {"labels": [0]}
    assert beh["shifted_test_loss"]["data"]["file"] == "artifacts/test_shifted.safetensors"
    assert len(d["reviewers"]) == 2 and len(d["policy"]) >= 1


# --------------------------------------------------------------------------- full build (slow)

@pytest.mark.slow
def test_full_build_figures(tmp_path, yaml_doc):
    cp.build_artifacts(tmp_path)
    art = tmp_path / "artifacts"
    for st in yaml_doc["stages"]:
        for key in ("start_checkpoint", "end_checkpoint", "optimizer_state", "log", "counterfactual_checkpoint"):
            assert (tmp_path / st[key]).is_file(), st[key]
        for c in st.get("checkpoints", []):
            assert (tmp_path / c["path"]).is_file()
    fig = cp.figures(art)
    final = fig["per_stage"]["calibrate"]
    assert final["test_accuracy"] > 0.9 and final["shifted_test_accuracy"] > 0.85
    assert final["test_loss"] < yaml_doc["policy"][0]["max"]
    # Site B's drift hurts the pretrained model, and fine-tuning on Site B repairs it.
    assert fig["per_stage"]["pretrain"]["shifted_test_loss"] > fig["per_stage"]["pretrain"]["test_loss"]
    assert fig["tau"]["shift_finetune"]["shifted_test_loss"] < 0
