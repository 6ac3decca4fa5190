"""Input formats beyond the toy's defaults: Parquet step logs, .pt checkpoints (weights only; a
pickled object is refused, not executed), evaluation data from a factory, and a callable behaviour."""

import pickle
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner

from auditor import AuditConfig, AuditorError, estimate, load_pipeline
from auditor.checkpoints import load_tensors
from auditor.cli import cli
from toy import StageSpec, write_pipeline

STAGES = [StageSpec("a", steps=4), StageSpec("b", reset=False, steps=3)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_pipeline(tmp_path_factory.mktemp("toy"), STAGES)


def copy_with(toy, tmp_path, edit):
    shutil.copytree(toy.parent, tmp_path / "p")
    path = tmp_path / "p" / "pipeline.yaml"
    doc = yaml.safe_load(path.read_text())
    edit(doc, tmp_path / "p")
    path.write_text(yaml.safe_dump(doc))
    return path


def effects(path):
    res = estimate(load_pipeline(path), AuditConfig(build=False)).to_dict()
    return {b["name"]: b["per_example"]["effects"] for b in res["behaviors"]}


def test_parquet_log_gives_the_same_results(toy, tmp_path):
    def edit(doc, root):
        for st in doc["stages"]:
            df = pd.read_csv(root / st["log"])
            df.to_parquet(root / (st["log"] + ".parquet"))
            st["log"] = st["log"] + ".parquet"
    assert effects(copy_with(toy, tmp_path, edit)) == effects(toy)


def test_pt_checkpoints_load_with_weights_only(toy, tmp_path):
    def edit(doc, root):
        for st in doc["stages"]:
            for key in ("start_checkpoint", "end_checkpoint"):
                sd = load_tensors(root / st[key])
                torch.save(sd, root / (st[key] + ".pt"))
                st[key] = st[key] + ".pt"
    assert effects(copy_with(toy, tmp_path, edit)) == effects(toy)


class Boom:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_pickled_object_in_pt_is_refused_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"lin.weight": Boom()}, fh)
    with pytest.raises(AuditorError) as err:
        load_tensors(path)
    assert "evil.pt" in str(err.value)
    assert not (tmp_path / "PWNED").exists()


FACTORY = '''
import torch
from safetensors.torch import load_file

def eval_set(scale=1.0):
    d = load_file("{root}/eval.safetensors")
    return {{"x": d["x"] * scale, "y": d["y"], "ids": d["ids"]}}

def neg_logit0(logits, y):
    return -logits[:, 0]
'''


def test_data_factory_and_callable_behaviour(toy, tmp_path):
    def edit(doc, root):
        (root / "evalfactory.py").write_text(FACTORY.format(root=root))
        doc["behaviors"] = [
            {"name": "loss_file", "data": {"file": "eval.safetensors"}, "kind": "loss"},
            {"name": "loss_factory", "data": {"factory": "evalfactory:eval_set", "kwargs": {"scale": 1.0}},
             "kind": "loss"},
            {"name": "custom", "data": {"file": "eval.safetensors"}, "kind": "callable",
             "callable": "evalfactory:neg_logit0"},
            {"name": "margin0", "data": {"file": "eval.safetensors"}, "kind": "margin", "class": 0},
        ]
    eff = effects(copy_with(toy, tmp_path, edit))
    for st in ("a", "b"):
        assert eff["loss_factory"][st] == eff["loss_file"][st]
        # −logit0 is linear in the last layer's output; its linear and shifted forms are finite numbers
        assert all(np.isfinite(v).all() for v in (np.array(x) for x in eff["custom"][st].values()))
        assert eff["custom"][st]["shifted"] != eff["margin0"][st]["shifted"]


def test_class_beyond_outputs_is_a_one_line_error(toy, tmp_path):
    path = copy_with(toy, tmp_path, lambda d, r: d["behaviors"].__setitem__(
        1, {"name": "p9", "data": {"file": "eval.safetensors"}, "kind": "prob", "class": 9}))
    r = CliRunner().invoke(cli, ["generate", str(path), "--out", str(tmp_path / "out"), "--format", "json"])
    assert r.exit_code == 2 and "class 9" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()
