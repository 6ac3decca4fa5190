"""Bad input found by trying to break the CLI: each gives one line naming the file or field, exit 2,
no traceback, and no output folder; nothing rewrites the user's files."""

import shutil

import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from auditor.cli import cli
from toy import StageSpec, write_pipeline

STAGES = [StageSpec("a", steps=4), StageSpec("b", reset=False, steps=3)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_pipeline(tmp_path_factory.mktemp("toy"), STAGES)


@pytest.fixture
def work(toy, tmp_path):
    shutil.copytree(toy.parent, tmp_path / "p")
    return tmp_path / "p"


def edit_yaml(root, fn):
    path = root / "pipeline.yaml"
    doc = yaml.safe_load(path.read_text())
    fn(doc)
    path.write_text(yaml.safe_dump(doc))


def run(*args, env=None):
    return CliRunner().invoke(cli, list(map(str, args)), env=env)


def generate(root, *extra, env=None):
    return run("generate", root / "pipeline.yaml", "--out", root / "OUT", "--format", "json", "-q", *extra, env=env)


def one_line(r, *needles, code=2):
    assert r.exit_code == code, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_factory_calling_sys_exit_is_bad_input(work):
    (work / "badmod.py").write_text("import sys\ndef build(**kw):\n    sys.exit(0)\n")
    edit_yaml(work, lambda d: d["model"].update(factory="badmod:build"))
    one_line(run("validate", work / "pipeline.yaml"), "model.factory", "SystemExit")
    one_line(generate(work), "model.factory")
    assert not (work / "OUT").exists()


def test_module_with_syntax_error(work):
    (work / "broken.py").write_text("def build(:\n")
    edit_yaml(work, lambda d: d["model"].update(factory="broken:build"))
    one_line(run("validate", work / "pipeline.yaml"), "model.factory", "SyntaxError")


def test_nan_in_optimizer_state(work):
    sd = load_file(str(work / "a_optim.safetensors"))
    save_file({k: torch.full_like(v, float("nan")) for k, v in sd.items()}, str(work / "a_optim.safetensors"))
    one_line(run("validate", work / "pipeline.yaml"), "a_optim.safetensors", "NaN")
    one_line(generate(work), "a_optim.safetensors")
    assert not (work / "OUT").exists()


def test_nan_in_eval_inputs(work):
    d = load_file(str(work / "eval.safetensors"))
    d["x"][0, 0] = float("nan")
    save_file(d, str(work / "eval.safetensors"))
    one_line(generate(work), "x holds NaN")
    assert not (work / "OUT").exists()


def test_label_outside_the_classes_is_caught_by_validate(work):
    d = load_file(str(work / "eval.safetensors"))
    d["y"][0] = 7
    save_file(d, str(work / "eval.safetensors"))
    one_line(run("validate", work / "pipeline.yaml"), "label 7", "behaviors.loss.data")


def test_non_integer_steps(work):
    df = pd.read_csv(work / "a_log.csv")
    df["step"] = df["step"] + 0.5
    df.to_csv(work / "a_log.csv", index=False)
    one_line(run("validate", work / "pipeline.yaml"), "a_log.csv", "integer")


def test_empty_batch_cell(work):
    df = pd.read_csv(work / "a_log.csv")
    df["batch"] = "1 2"
    df.loc[df["step"] == 2, "batch"] = ""
    df.to_csv(work / "a_log.csv", index=False)
    one_line(run("validate", work / "pipeline.yaml"), "a_log.csv", "step 2")


def test_out_is_a_file_fails_before_the_audit(work):
    (work / "OUT").write_text("keep me")
    one_line(generate(work), "--out")
    assert (work / "OUT").read_text() == "keep me"


def test_partly_missing_artifacts_are_not_rebuilt(work):
    edit_yaml(work, lambda d: d.update(build={"factory": "toy:build_artifacts"}))
    (work / "b_end.safetensors").unlink()
    one_line(generate(work), "stages[1].end_checkpoint", "b_end.safetensors")
    assert not (work / "BUILT").exists()


def test_duplicate_yaml_key(work):
    text = (work / "pipeline.yaml").read_text()
    (work / "pipeline.yaml").write_text(text + "\nsystem: {name: x, version: '1', owner: y}\n")
    one_line(run("validate", work / "pipeline.yaml"), "duplicate key 'system'")


def test_unquoted_version_is_rejected(work):
    edit_yaml(work, lambda d: d["system"].update(version=1.1))
    one_line(run("validate", work / "pipeline.yaml"), "system.version")


def test_duplicate_gate_ids_caught_by_validate(work):
    gate = {"id": "g", "rule": "final_value", "behavior": "loss", "max": 10}
    edit_yaml(work, lambda d: d.update(policy=[gate, gate]))
    one_line(run("validate", work / "pipeline.yaml"), "policy[1].id", "pipeline.yaml")


def test_huge_source_date_epoch(work):
    one_line(generate(work, env={"SOURCE_DATE_EPOCH": "99999999999999999999"}), "SOURCE_DATE_EPOCH")
    assert not (work / "OUT").exists()


def test_keygen_name_too_long(tmp_path):
    one_line(run("keygen", "--out", tmp_path / "k", "--name", "x" * 65), "--name", "64")


def test_integer_weights_are_refused(work):
    sd = load_file(str(work / "a_start.safetensors"))
    save_file({k: v.to(torch.int32) for k, v in sd.items()}, str(work / "a_start.safetensors"))
    one_line(run("validate", work / "pipeline.yaml"), "a_start.safetensors", "floating-point")
