"""`auditor validate` / `schema`: bad input gives one line naming the file or field, exit 2."""

import json

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from auditor.cli import cli
from toy import StageSpec, write_pipeline


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    write_pipeline(root, [StageSpec("a"), StageSpec("b", reset=False), StageSpec("c")])
    return root


def run(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


def one_line_error(result, code=2):
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def edit_yaml(src_dir, dst_dir, fn):
    import shutil

    shutil.copytree(src_dir, dst_dir)
    doc = yaml.safe_load((dst_dir / "pipeline.yaml").read_text())
    fn(doc)
    (dst_dir / "pipeline.yaml").write_text(yaml.safe_dump(doc))
    return dst_dir / "pipeline.yaml"


def test_valid_pipeline(toy_dir):
    r = run("validate", toy_dir / "pipeline.yaml")
    assert r.exit_code == 0 and r.output.startswith("ok: ") and "3 stages" in r.output


def test_missing_checkpoint(toy_dir, tmp_path):
    path = edit_yaml(toy_dir, tmp_path / "p", lambda d: d["stages"][1].update(end_checkpoint="nope.safetensors"))
    line = one_line_error(run("validate", path))
    assert "stages[1].end_checkpoint" in line and "nope.safetensors" in line


def test_non_contiguous_log(toy_dir, tmp_path):
    import shutil

    shutil.copytree(toy_dir, tmp_path / "p")
    log = tmp_path / "p" / "b_log.csv"
    df = pd.read_csv(log)
    df.loc[df["step"] >= 7, "step"] += 1  # a hole between 6 and 8
    df.to_csv(log, index=False)
    line = one_line_error(run("validate", tmp_path / "p" / "pipeline.yaml"))
    assert "b_log.csv" in line and "'step'" in line and "contiguous" in line


def test_log_not_starting_where_previous_stage_ended(toy_dir, tmp_path):
    import shutil

    shutil.copytree(toy_dir, tmp_path / "p")
    log = tmp_path / "p" / "c_log.csv"
    df = pd.read_csv(log)
    df["step"] += 3
    df.to_csv(log, index=False)
    line = one_line_error(run("validate", tmp_path / "p" / "pipeline.yaml"))
    assert "c_log.csv" in line and "starts at 13; expected 10" in line


def test_momentum_out_of_range(toy_dir, tmp_path):
    import shutil

    shutil.copytree(toy_dir, tmp_path / "p")
    log = tmp_path / "p" / "a_log.csv"
    df = pd.read_csv(log)
    df.loc[2, "momentum"] = 1.5
    df.to_csv(log, index=False)
    line = one_line_error(run("validate", tmp_path / "p" / "pipeline.yaml"))
    assert "a_log.csv" in line and "'momentum'" in line and "1.5" in line


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["stages"][0].pop("owner"), "stages[0].owner"),
    (lambda d: d["stages"][0]["optimizer"].update(kind="adam"), "stages[0].optimizer.kind"),
    (lambda d: d["behaviors"][1].pop("class"), "behaviors[1]"),
    (lambda d: d.update(format=2), "format"),
    (lambda d: d["stages"][0].update(reset=False), "stages[0].reset"),
    (lambda d: d.update(policy=[{"id": "g", "rule": "final_value", "behavior": "nope", "max": 1}]), "policy[0].behavior"),
    (lambda d: d["stages"][1].update(name="a"), "stages[1].name"),
    (lambda d: d["model"].update(factory="no_such_module:f"), "model.factory"),
])
def test_schema_and_semantic_errors_name_the_field(toy_dir, tmp_path, edit, field):
    line = one_line_error(run("validate", edit_yaml(toy_dir, tmp_path / "p", edit)))
    assert field in line, line


def test_nan_in_log(toy_dir, tmp_path):
    import shutil

    shutil.copytree(toy_dir, tmp_path / "p")
    log = tmp_path / "p" / "a_log.csv"
    df = pd.read_csv(log)
    df["lr"] = df["lr"].astype(object)
    df.loc[0, "lr"] = "nan"
    df.to_csv(log, index=False)
    line = one_line_error(run("validate", tmp_path / "p" / "pipeline.yaml"))
    assert "a_log.csv" in line and "'lr'" in line


def test_not_yaml(tmp_path):
    (tmp_path / "x.yaml").write_text("a: [1, 2\n")
    line = one_line_error(run("validate", tmp_path / "x.yaml"))
    assert "x.yaml" in line and "YAML" in line


def test_schema_command_prints_the_json_schema():
    r = run("schema")
    assert r.exit_code == 0
    assert json.loads(r.output)["title"].startswith("auditor")


def test_debug_shows_traceback_and_keeps_the_exit_code(tmp_path):
    r = CliRunner().invoke(cli, ["--debug", "validate", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2
    assert "Traceback" in r.output and r.output.strip().splitlines()[-1].startswith("error: ")
