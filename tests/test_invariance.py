"""The fast path (logits shared between behaviours, chunked evaluation) equals the slow per-behaviour
reference (auditor.estimators on f = g ∘ z), and chunking does not change results."""

import numpy as np
import torch

from auditor import AuditConfig, estimate, load_pipeline
from auditor.behaviors import behavior_fn, load_eval_data
from auditor.checkpoints import load_momentum, load_params
from auditor.estimators import embedding, linear, midpoint, shifted
from auditor.propagation import propagation_coefficients
from toy import StageSpec, write_pipeline

TOL = 1e-12
STAGES = [StageSpec("a", steps=4), StageSpec("b", reset=False, steps=3), StageSpec("c", steps=3)]
BEHAVIOURS = [
    {"name": "loss", "data": {"file": "eval.safetensors"}, "kind": "loss"},
    {"name": "prob_sub", "data": {"file": "eval.safetensors"}, "kind": "prob", "class": 2,
     "subset": {"exclude_labels": [2]}},
    {"name": "margin", "data": {"file": "eval.safetensors"}, "kind": "margin", "class": 0},
    {"name": "acc", "data": {"file": "eval.safetensors"}, "kind": "accuracy"},
]


def test_fast_path_equals_reference_and_chunking_is_invisible(tmp_path):
    path = write_pipeline(tmp_path, STAGES, loss="quadratic", behaviors=BEHAVIOURS, n_eval=30)
    p = load_pipeline(path)
    fast = estimate(p, AuditConfig(build=False, eval_chunk=None)).to_dict()
    chunked = estimate(p, AuditConfig(build=False, eval_chunk=7)).to_dict()

    model = p.build_model()
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: q.shape for n, q in model.named_parameters()}
    kw = dict(dtype=torch.float64, device=torch.device("cpu"))
    sch = p.load_schedules(names)
    theta_T = load_params(p.stages[-1].end_checkpoint, names, shapes, **kw)
    for i, b in enumerate(p.behaviors):
        f = behavior_fn(model, b, load_eval_data(p, b, i), {})
        fb, cb = fast["behaviors"][i], chunked["behaviors"][i]
        for k, s in enumerate(p.stages):
            a = load_params(s.start_checkpoint, names, shapes, **kw)
            end = load_params(s.end_checkpoint, names, shapes, **kw)
            delta = {n: end[n] - a[n] for n in names}
            m_b = load_momentum(s.optimizer_state, names, shapes, **kw)
            m_a = load_momentum(None if s.reset else p.stages[k - 1].optimizer_state, names, shapes, **kw)
            e = embedding(delta, {n: m_b[n] - m_a[n] for n in names}, propagation_coefficients(sch, k, names))
            ref = {"naive": shifted(f, theta_T, delta), "shifted": shifted(f, theta_T, e)}
            if b.differentiable:
                ref.update(linear=linear(f, theta_T, e), midpoint=midpoint(f, theta_T, e))
            for est, r in ref.items():
                got = np.asarray(fb["per_example"]["effects"][s.name][est])
                assert np.abs(got - r.numpy()).max() <= TOL * max(1.0, np.abs(r.numpy()).max()), (b.name, s.name, est)
                got_c = np.asarray(cb["per_example"]["effects"][s.name][est])
                assert np.abs(got_c - got).max() <= TOL * max(1.0, np.abs(got).max()), (b.name, s.name, est)
    assert len(fast["behaviors"][1]["per_example"]["ids"]) < 30  # the subset really selected rows
