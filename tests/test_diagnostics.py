"""StepDiagnostics against statistics recomputed by hand from the gradients, Adam's state and reference masks."""

import pytest
import torch
from reference import reference_mask
from torch import nn

import nmflow
from nmflow.diagnostics import StepDiagnostics, flip_rate

LAYERS = ("0", "2")  # the two FF-like Linear layers, reached by regex


def _setup(method: str, pattern: str = "1:4", total_steps: int = 20):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    recipe = nmflow.Recipe(method, {r"re:(0|2)": pattern}, dense_steps=2, finetune_steps=4)
    sp = nmflow.sparsify(model, recipe, total_steps=total_steps, verbose=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    return model, sp, optimizer


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    module = model.get_submodule(name)
    return module.parametrizations.weight.original if hasattr(module, "parametrizations") else module.weight


def _train_step(model, optimizer, sp, diag, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 16, generator=generator)
    model(x).pow(2).mean().backward()
    diag.after_backward()
    grads = {name: _weight(model, name).grad.clone() for name in LAYERS}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sp.step()
    return grads, diag.after_step()


@pytest.mark.parametrize("method", ["srste", "mdgf-exp", "dense"])
def test_statistics_match_a_recomputation(method):
    model, sp, optimizer = _setup(method)
    diag = StepDiagnostics(sp, optimizer)
    for step in range(8):
        before = {name: _weight(model, name).detach().clone() for name in LAYERS}
        phase_before = sp.status().phase
        grads, record = _train_step(model, optimizer, sp, diag, step)
        after = {name: _weight(model, name).detach().clone() for name in LAYERS}

        expected_var = sum(float(grads[n].abs().double().var()) for n in LAYERS) / len(LAYERS)
        assert record["grad_abs_var"]["re:(0|2)"] == pytest.approx(expected_var, rel=1e-5)
        moments = [optimizer.state[_weight(model, n)]["exp_avg_sq"].double() for n in LAYERS]
        assert record["exp_avg_sq_var"]["re:(0|2)"] == pytest.approx(sum(float(v.var()) for v in moments) / 2, rel=1e-5)
        norms = sum(float(v.norm()) for v in moments) / 2
        assert record["exp_avg_sq_norm"]["re:(0|2)"] == pytest.approx(norms, rel=1e-5)

        def masks(weights, phase):
            if method == "dense" or phase is nmflow.Phase.DENSE:
                return {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
            return {n: reference_mask(w, 1, 4, dim=1) for n, w in weights.items()}

        expected_flips = flip_rate(masks(before, phase_before), masks(after, sp.status().phase))
        assert record["flip_rate"]["re:(0|2)"] == pytest.approx(expected_flips)


def test_the_dense_to_sparse_switch_is_a_flip_and_dense_runs_have_none():
    model, sp, optimizer = _setup("ste")
    diag = StepDiagnostics(sp, optimizer)
    rates = [_train_step(model, optimizer, sp, diag, step)[1]["flip_rate"]["re:(0|2)"] for step in range(3)]
    assert rates[0] == 0.0  # dense to dense
    assert rates[1] == pytest.approx(0.75)  # all True -> 1 of 4 kept: three quarters of the entries change


def test_packed_segments_are_reported_per_key():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    sp = nmflow.sparsify(layer, nmflow.Recipe("ste", {"ff": "1:4", "qk": "2:4"}), total_steps=10, verbose=False)
    optimizer = torch.optim.Adam(layer.parameters())
    diag = StepDiagnostics(sp, optimizer)
    layer(torch.randn(2, 5, 16)).sum().backward()
    diag.after_backward()
    in_proj = layer.self_attn.parametrizations.in_proj_weight.original
    expected_qk = float(in_proj.grad[:32].abs().double().var())  # q and k are rows 0-32 of the packed weight
    optimizer.step()
    sp.step()
    record = diag.after_step()
    assert set(record["grad_abs_var"]) == {"ff", "qk"}
    assert record["grad_abs_var"]["qk"] == pytest.approx(expected_qk, rel=1e-5)


def test_after_step_needs_after_backward():
    model, sp, optimizer = _setup("ste")
    with pytest.raises(RuntimeError, match="after_backward"):
        StepDiagnostics(sp, optimizer).after_step()
