"""The digits sample end to end (the README's first command, JSON only): the audit names the
planted spurious fine-tuning stage, retraining agrees, and the last stage is exact."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from auditor.cli import cli

SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "digits" / "pipeline.yaml"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    r = CliRunner().invoke(cli, ["generate", str(SAMPLE), "--out", str(out), "--format", "json", "-q"])
    assert r.exit_code == 0, r.output
    return json.loads((out / "results.json").read_text())


def test_spurious_stage_raised_the_probe_most_and_truth_agrees(results):
    s = next(x for x in results["summary"] if x["behavior"] == "spurious_probe")
    assert s["raised_most"]["stage"] == "finetune"
    assert s["raised_most"]["truth_same_stage"] is True
    probe = next(b for b in results["behaviors"] if b["name"] == "spurious_probe")
    truth = probe["truth"]
    assert max(truth, key=truth.get) == "finetune" and truth["finetune"] > 0


def test_last_stage_shifted_equals_retraining_on_every_behaviour(results):
    last = results["stages"][-1]["name"]
    for b in results["behaviors"]:
        est, tru = b["per_example"]["effects"][last]["shifted"], b["per_example"]["truth"][last]
        assert max(abs(x - y) for x, y in zip(est, tru)) <= 1e-6, b["name"]
        assert abs(b["effects"][last]["shifted"] - b["truth"][last]) <= 1e-6, b["name"]


def test_fidelity_reported_for_every_stage_and_estimator(results):
    for b in results["behaviors"]:
        for st in results["stages"]:
            fid = b["fidelity"][st["name"]]
            expected = {"naive", "shifted"} | ({"linear", "midpoint"} if b["differentiable"] else set())
            assert set(fid) == expected
            for m in fid.values():
                assert {"pearson", "spearman", "sign_agreement", "abs_error", "rel_error"} <= set(m)


def test_diagnostics_flag_the_first_stage(results):
    first = results["stages"][0]["name"]
    for b in results["behaviors"]:
        assert b["diagnostics"][first]["trusted"] is False, b["name"]


def test_accuracy_gets_the_gap_of_the_cross_entropy_on_its_examples(results):
    """Accuracy has no gradient, so its linear–shifted gap is taken on the cross-entropy of the same
    examples. clean_test_accuracy and clean_test_loss read the same 597 examples with a mean, so the
    two gaps must be the same numbers; and the finetune stage, whose loss is far from linear along
    its embedding, is no longer 'trusted' for accuracy either."""
    b = {x["name"]: x for x in results["behaviors"]}
    acc, loss = b["clean_test_accuracy"]["diagnostics"], b["clean_test_loss"]["diagnostics"]
    for stage in acc:
        assert acc[stage]["gap_source"] == "cross-entropy of the same examples"
        assert loss[stage]["gap_source"] == "the behaviour"
        assert acc[stage]["linear_shifted_gap"] == pytest.approx(loss[stage]["linear_shifted_gap"], rel=1e-9)
    assert acc["finetune"]["trusted"] is False and "cross-entropy" in acc["finetune"]["reason"]
