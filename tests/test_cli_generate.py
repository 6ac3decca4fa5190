"""`auditor generate` end to end on the toy pipeline: files, exit codes, gates, escaping, atomicity."""

import json

import pytest
import yaml
from click.testing import CliRunner

from auditor.cli import cli
from toy import StageSpec, write_pipeline

STAGES = [StageSpec("pre", steps=4), StageSpec("mid", reset=False, steps=3), StageSpec("post", steps=3)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_pipeline(tmp_path_factory.mktemp("toy"), STAGES)


def with_policy(path, policy, tmp_path, **system):
    doc = yaml.safe_load(path.read_text())
    doc["policy"] = policy
    doc["system"].update(system)
    out = path.parent / f"pipeline_{tmp_path.name}.yaml"
    out.write_text(yaml.safe_dump(doc))
    return out


def gen(path, out, *extra):
    return CliRunner().invoke(cli, ["generate", str(path), "--out", str(out), "-q", *map(str, extra)])


def test_json_and_html_written(toy, tmp_path):
    r = gen(toy, tmp_path / "r", "--format", "json", "--format", "html")
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "r" / "results.json").read_text())
    assert {b["name"] for b in data["behaviors"]} == {"loss", "prob1", "margin0", "acc"}
    assert set(data["behaviors"][0]["effects"]["pre"]) == {"naive", "linear", "midpoint", "shifted"}
    assert (tmp_path / "r" / "report.html").is_file() and not (tmp_path / "r" / "report.pdf").exists()
    assert "decision: PENDING" in r.output


def test_failing_gate_exits_3_and_still_writes(toy, tmp_path):
    path = with_policy(toy, [{"id": "tight", "rule": "final_value", "behavior": "loss", "max": -1.0}], tmp_path)
    r = gen(path, tmp_path / "r", "--format", "json")
    assert r.exit_code == 3, r.output
    assert "tight" in r.output
    data = json.loads((tmp_path / "r" / "results.json").read_text())
    assert data["gates"][0]["status"] == "FAIL" and data["decision"] == "BLOCKED"


def test_passing_gate_exits_0(toy, tmp_path):
    path = with_policy(toy, [{"id": "loose", "rule": "any_stage_effect", "behavior": "loss", "max": 1e9}], tmp_path)
    r = gen(path, tmp_path / "r", "--format", "json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r" / "results.json").read_text())["gates"][0]["status"] == "PASS"


def test_names_are_escaped_in_html(toy, tmp_path):
    path = with_policy(toy, [], tmp_path, name="<script>alert(1)</script>", owner="<b>x</b>")
    r = gen(path, tmp_path / "r", "--format", "html")
    assert r.exit_code == 0, r.output
    html = (tmp_path / "r" / "report.html").read_text()
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<b>x</b>" not in html


def test_bad_input_writes_nothing(toy, tmp_path):
    doc = yaml.safe_load(toy.read_text())
    doc["stages"][0]["end_checkpoint"] = "missing.safetensors"
    bad = toy.parent / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    r = gen(bad, tmp_path / "r")
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1].startswith("error: ") and "stages[0].end_checkpoint" in r.output
    assert not (tmp_path / "r").exists()
    assert not list(tmp_path.glob(".auditor-*"))


def test_results_reproducible_under_source_date_epoch(toy, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    for d in ("a", "b"):
        assert gen(toy, tmp_path / d, "--format", "json", "--format", "html").exit_code == 0
    for f in ("results.json", "report.html"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert json.loads((tmp_path / "a" / "results.json").read_text())["generated_at"] == "2023-11-14T22:13:20Z"


def test_device_errors_name_the_option(toy, tmp_path):
    r = gen(toy, tmp_path / "r", "--device", "tpu")
    assert r.exit_code == 2
    assert "--device: device 'tpu'; expected 'auto', 'cpu' or 'cuda[:i]'" in r.output
    assert "config.device" not in r.output and "Traceback" not in r.output
    assert not (tmp_path / "r").exists()
