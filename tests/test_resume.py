"""A run saved and resumed at any step, in any phase, ends bitwise equal to an uninterrupted run."""

import copy

import pytest
import torch
from torch import nn

import nmflow

T = 24  # dense 0-3, sparse 4-17, finetune 18-23, then past the end


def build(seed: int, method: str, **options):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    recipe = nmflow.Recipe(method, {"ff": "1:8", "qk": "1:4"}, dense_steps=4, finetune_steps=6, **options)
    sp = nmflow.sparsify(model, recipe, total_steps=T, verbose=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, sp, optimizer


def train(model, sp, optimizer, start: int, stop: int) -> None:
    for step in range(start, stop):
        x = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(step))
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        sp.step()


@pytest.mark.parametrize("method", nmflow.METHODS)
@pytest.mark.parametrize("resume_at", [2, 4, 11, 20])  # dense, first sparse step, sparse, finetune
def test_resume_is_exact(method, resume_at, tmp_path):
    model, sp, optimizer = build(0, method)
    train(model, sp, optimizer, 0, T + 2)
    sp.finalize()
    expected = model.state_dict()

    model, sp, optimizer = build(0, method)
    train(model, sp, optimizer, 0, resume_at)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict(), "sparsity": sp.state_dict()}, path)
    del model, sp, optimizer

    model, sp, optimizer = build(1, method)  # another init: everything must come from the checkpoint
    checkpoint = torch.load(path, weights_only=True)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optim"])
    sp.load_state_dict(checkpoint["sparsity"])
    assert sp.step_count == resume_at
    train(model, sp, optimizer, resume_at, T + 2)
    sp.finalize()
    resumed = model.state_dict()
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key


def test_oneshot_state_carries_its_frozen_masks():
    model, sp, optimizer = build(0, "oneshot")
    train(model, sp, optimizer, 0, 6)
    state = sp.state_dict()
    assert set(state["fixed_masks"]) == {t.qualified_name for t in sp.targets}
    assert all(mask.dtype == torch.bool for mask in state["fixed_masks"].values())


def test_load_state_dict_leaves_its_input_untouched():
    model, sp, optimizer = build(0, "oneshot")
    train(model, sp, optimizer, 0, 6)
    state = sp.state_dict()
    before = copy.deepcopy(state)
    other_model, other_sp, _ = build(1, "oneshot")
    other_sp.load_state_dict(state)
    assert state.keys() == before.keys() and state["step"] == before["step"]
    for name, mask in before["fixed_masks"].items():
        assert torch.equal(state["fixed_masks"][name], mask)
    assert sp.state_dict()["fixed_masks"].keys() == before["fixed_masks"].keys()  # the source keeps its masks


def test_state_from_another_run_is_refused():
    _, sp, _ = build(0, "mdgf-exp")
    _, other, _ = build(0, "srste")
    with pytest.raises(nmflow.ConfigError, match="another run"):
        other.load_state_dict(sp.state_dict())
    with pytest.raises(nmflow.ConfigError, match="lacks"):
        other.load_state_dict({"step": 3})


def test_an_mdgf_state_saved_before_0_2_keeps_the_decay_it_ran_with():
    _, sp, _ = build(0, "mdgf-exp")
    state = sp.state_dict()
    state["version"] = 1  # how 0.1 saved the default decay, which ended at 70% of the run: unsaid
    del state["recipe"]["decay_fraction"]
    with pytest.raises(nmflow.ConfigError, match=r"another run.*'decay_end_fraction': 0\.7"):
        sp.load_state_dict(state)  # resuming under today's default would change the decay mid-run
    _, pinned, _ = build(0, "mdgf-exp", decay_end_fraction=0.7)
    pinned.load_state_dict(state)
    assert pinned.step_count == 0


def test_state_survives_a_dtype_change():
    model, sp, optimizer = build(0, "oneshot")
    train(model, sp, optimizer, 0, 6)
    model.double()
    out = model(torch.randn(2, 5, 16, dtype=torch.float64))
    assert out.dtype == torch.float64
    assert all(mask.dtype == torch.bool for mask in sp.state_dict()["fixed_masks"].values())
