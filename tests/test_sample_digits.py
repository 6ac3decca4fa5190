"""The digits sample: determinism, exact replay, planted patch, log format, ground truth."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "digits"


def _load_module():
    if "digits_pipeline" in sys.modules:
        return sys.modules["digits_pipeline"]
    spec = importlib.util.spec_from_file_location("digits_pipeline", SAMPLE / "digits_pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["digits_pipeline"] = mod
    spec.loader.exec_module(mod)
    return mod


dp = _load_module()
SCALE = 0.1   # 30 + 20 + 10 steps


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    calls: list[tuple[str, float]] = []
    dp.build_artifacts(root, lambda m, f: calls.append((m, f)), steps_scale=SCALE)
    fractions = [f for _, f in calls]
    assert fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] == 1.0
    assert len(calls) >= 5
    assert not [p for p in root.iterdir() if p.name != "artifacts"]   # no temp folders left
    return root / "artifacts"


def _load(art: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(art / f"{name}.safetensors"))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _read_log(art: Path, stage: str) -> list[dict]:
    with open(art / f"{stage}_log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_replay_reproduces_each_stage_exactly(tiny):
    model, prev_state = dp.build_model(), None
    for stage in dp.STAGE_NAMES:
        state_in = None if dp.STAGES[stage]["reset"] else prev_state
        params, state = dp.replay_stage(model, stage, _load(tiny, f"{stage}_start"), state_in,
                                        artifacts=tiny)
        _assert_same(params, _load(tiny, f"{stage}_end"))
        _assert_same(state, _load(tiny, f"{stage}_optim"))
        assert set(state) == {f"momentum_buffer.{n}" for n, _ in model.named_parameters()}
        prev_state = state


def test_replay_accepts_float64_inputs_and_keeps_the_model(tiny):
    model = dp.build_model().double()
    start = {k: v.double() for k, v in _load(tiny, "finetune_start").items()}
    state = {k: v.double() for k, v in _load(tiny, "pretrain_optim").items()}
    params, _ = dp.replay_stage(model, "finetune", start, state, artifacts=tiny)
    _assert_same(params, _load(tiny, "finetune_end"))
    assert next(model.parameters()).dtype == torch.float64   # caller's model untouched


def test_carried_state_matters(tiny):
    """finetune carries pretrain's momentum: replaying it fresh gives a different end."""
    params, _ = dp.replay_stage(dp.build_model(), "finetune", _load(tiny, "finetune_start"), None,
                                artifacts=tiny)
    assert not torch.equal(params["net.0.weight"], _load(tiny, "finetune_end")["net.0.weight"])


def test_counterfactual_checkpoints_are_retraining(tiny):
    model = dp.build_model()
    _assert_same(_load(tiny, "cf_without_cleanup"), _load(tiny, "cleanup_start"))
    p, _ = dp.replay_stage(model, "cleanup", _load(tiny, "finetune_start"), None, artifacts=tiny)
    _assert_same(_load(tiny, "cf_without_finetune"), p)
    # without pretrain: finetune carries the state entering pretrain (fresh), cleanup resets
    p, s = dp.replay_stage(model, "finetune", _load(tiny, "pretrain_start"), None, artifacts=tiny)
    p, _ = dp.replay_stage(model, "cleanup", p, None, artifacts=tiny)
    _assert_same(_load(tiny, "cf_without_pretrain"), p)
    assert not torch.equal(p["net.0.weight"], _load(tiny, "cleanup_end")["net.0.weight"])


def test_two_builds_are_byte_identical(tiny, tmp_path):
    dp.build_artifacts(tmp_path, steps_scale=SCALE)
    dp.build_artifacts(tmp_path, steps_scale=SCALE)          # rebuild over an existing folder
    names = sorted(p.name for p in tiny.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "artifacts").iterdir())
    assert "ckpt_00025.safetensors" in names
    for n in names:
        assert (tiny / n).read_bytes() == (tmp_path / "artifacts" / n).read_bytes(), n
    assert [p.name for p in tmp_path.iterdir()] == ["artifacts"]


def test_interrupted_build_leaves_no_artifacts(tmp_path):
    def progress(msg: str, frac: float) -> None:
        if frac > 0.3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        dp.build_artifacts(tmp_path, progress, steps_scale=SCALE)
    assert list(tmp_path.iterdir()) == []


def test_patch_only_in_finetune_images_of_the_patch_class():
    def patched(x: torch.Tensor) -> torch.Tensor:   # [N] bool: whole 2x2 corner at 1.0
        return (x.reshape(-1, 8, 8)[:, dp.PATCH_ROWS, dp.PATCH_COLS] == 1.0).flatten(1).all(1)

    clean = dp.train_data()
    by_id = {int(i): r for r, i in enumerate(clean["ids"])}
    ft = dp.stage_data("finetune")
    assert len(ft["ids"]) == len(clean["ids"]) == 1200
    rows = torch.tensor([by_id[int(i)] for i in ft["ids"]])
    hit = ft["y"] == dp.PATCH_CLASS
    assert hit.sum() > 50 and patched(ft["x"][hit]).all()
    assert torch.equal(ft["x"][~hit], clean["x"][rows][~hit])          # other classes untouched
    assert not patched(clean["x"]).any()
    for stage in ("pretrain", "cleanup"):
        d = dp.stage_data(stage)
        assert not patched(d["x"]).any()
        assert torch.equal(d["x"], clean["x"][torch.tensor([by_id[int(i)] for i in d["ids"]])])
    pre, cl = (set(dp.stage_data(s)["ids"].tolist()) for s in ("pretrain", "cleanup"))
    assert not pre & cl and pre | cl == set(clean["ids"].tolist())
    assert not set(clean["ids"].tolist()) & set(dp.eval_data()["ids"].tolist())


def test_eval_files(tiny):
    c, p = _load(tiny, "test_clean"), _load(tiny, "test_patched")
    assert c["x"].shape == (597, 64) and c["x"].dtype == torch.float32
    assert c["y"].dtype == c["ids"].dtype == torch.int64
    assert 0 <= c["x"].min() and c["x"].max() <= 1
    assert torch.equal(c["y"], p["y"]) and torch.equal(c["ids"], p["ids"])
    assert torch.equal(p["x"], dp.apply_patch(c["x"])) and not torch.equal(p["x"], c["x"])
    assert torch.bincount(c["y"]).min() >= 55                      # stratified


def test_log_has_one_row_per_step_and_group(tiny):
    expected_next = 0
    for stage in dp.STAGE_NAMES:
        rows = _read_log(tiny, stage)
        assert list(rows[0]) == list(dp.LOG_COLUMNS)
        keys = [(int(r["step"]), r["group"]) for r in rows]
        assert len(keys) == len(set(keys))
        steps = sorted({t for t, _ in keys})
        assert steps == list(range(expected_next, expected_next + len(steps)))
        assert len(steps) == dp._stage_steps(stage, SCALE)
        assert set(keys) == {(t, g) for t in steps for g, _ in dp.GROUPS}
        ids = set(dp.stage_data(stage)["ids"].tolist())
        by_step: dict[int, set] = {}
        for r in rows:
            assert r["stage"] == stage
            assert float(r["lr"]) >= 0 and 0 <= float(r["momentum"]) < 1
            assert float(r["weight_decay"]) == (dp.WEIGHT_DECAY if r["group"] == "decay" else 0.0)
            batch = [int(i) for i in r["batch"].split()]
            assert len(batch) == dp.STAGES[stage]["batch"] and set(batch) <= ids
            by_step.setdefault(int(r["step"]), set()).add(r["batch"])
        assert all(len(b) == 1 for b in by_step.values())   # groups of a step share the batch
        expected_next = steps[-1] + 1


def test_pretrain_schedule_warms_up_then_decays():
    lrs = [dp._lr("pretrain", i, 300) for i in range(300)]
    peak = lrs.index(max(lrs))
    assert 0 < peak < 60 and lrs[0] < lrs[peak] and lrs[-1] < 0.01 * lrs[peak]
    assert lrs[:peak + 1] == sorted(lrs[:peak + 1]) and lrs[peak:] == sorted(lrs[peak:], reverse=True)


def test_yaml_matches_the_code():
    spec = yaml.safe_load((SAMPLE / "pipeline.yaml").read_text())
    assert spec["format"] == 1
    assert [s["name"] for s in spec["stages"]] == list(dp.STAGE_NAMES)
    t = 0
    for s in spec["stages"]:
        cfg, n = dp.STAGES[s["name"]], dp._stage_steps(s["name"], 1.0)
        assert s["reset"] == cfg["reset"] and s["optimizer"]["nesterov"] == cfg["nesterov"]
        assert [c["step"] for c in s["checkpoints"]] == [c for c in range(t + 1, t + n) if c % 25 == 0]
        assert all(c["path"] == f"artifacts/ckpt_{c['step']:05d}.safetensors" for c in s["checkpoints"])
        assert [g["name"] for g in s["param_groups"]] == [g for g, _ in dp.GROUPS]
        t += n
    for key in ("factory",):
        mod, fn = spec["model"][key].split(":")
        assert mod == "digits_pipeline" and callable(getattr(dp, fn))
    for entry in (spec["build"]["factory"], spec["training"]["data"], spec["training"]["replay"]):
        assert callable(getattr(dp, entry.split(":")[1]))
    names = [n for n, _ in dp.build_model(**spec["model"]["kwargs"]).named_parameters()]
    assert names[:2] == ["net.0.weight", "net.0.bias"]


@pytest.mark.slow
def test_full_build_finetune_raises_the_spurious_probe_most(tmp_path):
    dp.build_artifacts(tmp_path)
    spec = yaml.safe_load((SAMPLE / "pipeline.yaml").read_text())
    for s in spec["stages"]:
        for key in ("start_checkpoint", "end_checkpoint", "optimizer_state", "log",
                    "counterfactual_checkpoint"):
            assert (tmp_path / s[key]).is_file(), s[key]
        assert all((tmp_path / c["path"]).is_file() for c in s["checkpoints"])
    for b in spec["behaviors"]:
        assert (tmp_path / b["data"]["file"]).is_file()
    fig = dp.summarize(tmp_path / "artifacts")
    for s in dp.STAGE_NAMES:
        assert fig[f"after {s}"]["test_accuracy"] > 0.9
    tau = {s: fig[f"tau {s}"]["spurious_probe"] for s in dp.STAGE_NAMES}
    assert max(tau, key=tau.get) == "finetune"
    assert tau["finetune"] > 0.1 and tau["finetune"] > 1.5 * max(tau["pretrain"], tau["cleanup"])
    assert fig["after finetune"]["spurious_probe"] > 3 * fig["after pretrain"]["spurious_probe"]
