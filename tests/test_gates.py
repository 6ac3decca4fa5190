"""Release gates: auditor.gates.evaluate_gates / decision / raise_for_gates."""

from __future__ import annotations

import math

import pytest

from auditor.errors import AuditorError, GateFailure
from auditor.gates import decision, evaluate_gates, raise_for_gates


@pytest.fixture
def results():
    return {
        "estimators": ["naive", "linear", "midpoint", "shifted"],
        "primary_estimator": "shifted",
        "stages": [{"name": "pretrain"}, {"name": "finetune"}, {"name": "align"}],
        "behaviors": [
            {"name": "loss", "kind": "loss", "factual": 0.21,
             "effects": {"pretrain": {"naive": -2.8, "linear": -1.3, "midpoint": -1.6, "shifted": -1.9},
                         "finetune": {"naive": -0.07, "linear": -0.04, "midpoint": -0.05, "shifted": -0.046},
                         "align": {"naive": 0.0119, "linear": 0.0123, "midpoint": 0.0119, "shifted": 0.012}}},
            {"name": "probe", "kind": "prob", "factual": 0.4,
             "effects": {"pretrain": {"naive": 0.01, "linear": 0.02, "midpoint": 0.02, "shifted": 0.02},
                         "finetune": {"naive": 0.25, "linear": 0.3, "midpoint": 0.3, "shifted": 0.31},
                         "align": {"naive": -0.1, "linear": -0.1, "midpoint": -0.1, "shifted": -0.1}}},
            {"name": "acc", "kind": "accuracy", "factual": 0.97,
             "effects": {s: {"naive": 0.1, "linear": None, "midpoint": None, "shifted": 0.1}
                         for s in ("pretrain", "finetune", "align")}},
        ],
    }


def one(policy_item, results):
    (g,) = evaluate_gates([policy_item], results)
    return g


def test_stage_effect_fail_and_pass(results):
    g = one({"id": "spurious", "rule": "stage_effect", "stage": "finetune", "behavior": "probe", "max": 0.05}, results)
    assert g["status"] == "FAIL"
    assert g["observed"] == pytest.approx(0.31)
    assert g["estimator"] == "shifted" and g["stage"] == "finetune"
    assert "0.31" in g["detail"] and "0.05" in g["detail"] and "above the maximum" in g["detail"]
    assert g["detail"].count(".") >= 1 and "\n" not in g["detail"]
    g = one({"id": "s2", "rule": "stage_effect", "stage": "finetune", "behavior": "probe", "max": 0.5}, results)
    assert g["status"] == "PASS" and "within the maximum 0.5" in g["detail"]


def test_stage_effect_explicit_estimator_and_min(results):
    g = one({"id": "x", "rule": "stage_effect", "stage": "finetune", "behavior": "probe",
             "estimator": "naive", "min": 0.26}, results)
    assert g["estimator"] == "naive" and g["observed"] == pytest.approx(0.25)
    assert g["status"] == "FAIL" and "below the minimum 0.26" in g["detail"]


def test_bounds_are_inclusive(results):
    g = one({"id": "x", "rule": "stage_effect", "stage": "finetune", "behavior": "probe",
             "min": 0.31, "max": 0.31}, results)
    assert g["status"] == "PASS"


def test_any_stage_effect_reports_offending_stage(results):
    g = one({"id": "no-raise", "rule": "any_stage_effect", "behavior": "probe", "max": 0.1}, results)
    assert g["status"] == "FAIL" and g["stage"] == "finetune" and g["observed"] == pytest.approx(0.31)
    g = one({"id": "no-lower", "rule": "any_stage_effect", "behavior": "probe", "min": -0.05}, results)
    assert g["status"] == "FAIL" and g["stage"] == "align"
    g = one({"id": "ok", "rule": "any_stage_effect", "behavior": "loss", "max": 0.1}, results)
    assert g["status"] == "PASS" and g["stage"] == "align"  # the stage closest to the bound
    assert g["observed"] == pytest.approx(0.012)


def test_final_value(results):
    g = one({"id": "final-loss", "rule": "final_value", "behavior": "loss", "max": 0.5}, results)
    assert g["status"] == "PASS" and g["observed"] == pytest.approx(0.21)
    assert g["stage"] is None and g["estimator"] is None
    g = one({"id": "f2", "rule": "final_value", "behavior": "loss", "max": 0.5, "estimator": "naive"}, results)
    assert g["status"] == "PASS" and g["estimator"] is None  # allowed, has no effect
    g = one({"id": "acc", "rule": "final_value", "behavior": "acc", "min": 0.98}, results)
    assert g["status"] == "FAIL" and "0.97" in g["detail"]


def test_non_finite_value_fails(results):
    results["behaviors"][0]["factual"] = math.nan
    g = one({"id": "f", "rule": "final_value", "behavior": "loss", "max": 0.5}, results)
    assert g["status"] == "FAIL" and g["observed"] is None and "not a finite number" in g["detail"]


def test_result_fields_and_order(results):
    policy = [
        {"id": "a", "rule": "final_value", "behavior": "loss", "max": 0.5, "description": "Loss stays low"},
        {"id": "b", "rule": "stage_effect", "stage": "finetune", "behavior": "probe", "max": 0.05},
    ]
    gates = evaluate_gates(policy, results)
    assert [g["id"] for g in gates] == ["a", "b"]
    assert set(gates[0]) == {"id", "rule", "description", "behavior", "stage", "estimator", "observed",
                             "min", "max", "status", "detail"}
    assert gates[0]["description"] == "Loss stays low"
    assert gates[1]["description"]  # a default description is written


def test_decision():
    assert decision([]) == "PENDING"
    assert decision([{"status": "PASS"}, {"status": "PASS"}]) == "APPROVED"
    assert decision([{"status": "PASS"}, {"status": "FAIL"}]) == "BLOCKED"


def test_raise_for_gates(results):
    gates = evaluate_gates([{"id": "spurious", "rule": "stage_effect", "stage": "finetune",
                             "behavior": "probe", "max": 0.05}], results)
    with pytest.raises(GateFailure, match="spurious") as e:
        raise_for_gates(gates)
    assert e.value.exit_code == 3
    raise_for_gates([g | {"status": "PASS"} for g in gates])  # no exception


def test_no_policy(results):
    assert evaluate_gates(None, results) == []
    assert evaluate_gates([], results) == []


@pytest.mark.parametrize("item, where", [
    ({"id": "x", "rule": "stage_effect", "stage": "finetune", "behavior": "nope", "max": 1}, "policy[1].behavior"),
    ({"id": "x", "rule": "stage_effect", "stage": "nope", "behavior": "loss", "max": 1}, "policy[1].stage"),
    ({"id": "x", "rule": "stage_effect", "behavior": "loss", "max": 1}, "policy[1].stage"),
    ({"id": "x", "rule": "biggest_effect", "behavior": "loss", "max": 1}, "policy[1].rule"),
    ({"id": "x", "rule": "final_value", "behavior": "loss"}, "policy[1].min"),
    ({"id": "x", "rule": "final_value", "behavior": "loss", "max": "high"}, "policy[1].max"),
    ({"id": "x", "rule": "final_value", "behavior": "loss", "min": 2, "max": 1}, "policy[1].min"),
    ({"id": "x", "rule": "final_value", "behavior": "loss", "maximum": 1}, "policy[1].maximum"),
    ({"id": "x", "rule": "final_value", "behavior": "loss", "stage": "align", "max": 1}, "policy[1].stage"),
    ({"id": "x", "rule": "any_stage_effect", "behavior": "loss", "stage": "align", "max": 1}, "policy[1].stage"),
    ({"id": "x", "rule": "final_value", "behavior": "loss", "estimator": "magic", "max": 1}, "policy[1].estimator"),
    ({"id": "x", "rule": "stage_effect", "stage": "align", "behavior": "loss", "estimator": "magic", "max": 1},
     "policy[1].estimator"),
    ({"id": "x", "rule": "stage_effect", "stage": "align", "behavior": "acc", "estimator": "linear", "max": 1},
     "policy[1].estimator"),
    ({"rule": "final_value", "behavior": "loss", "max": 1}, "policy[1].id"),
    ({"id": "ok", "rule": "final_value", "behavior": "loss", "max": 1}, "policy[1].id"),  # duplicate id
    ("final_value", "policy[1]"),
])
def test_bad_policy_names_the_field(results, item, where):
    policy = [{"id": "ok", "rule": "final_value", "behavior": "loss", "max": 1}, item]
    with pytest.raises(AuditorError) as e:
        evaluate_gates(policy, results)
    assert str(e.value).startswith(where + ":"), str(e.value)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)


def test_policy_not_a_list(results):
    with pytest.raises(AuditorError, match=r"^policy:"):
        evaluate_gates({"id": "x"}, results)
