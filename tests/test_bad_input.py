"""Bad input: a clear error naming the culprit, and the model left exactly as it was."""

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import nmflow


def tiny_encoder(dim_ff: int = 32) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_ff, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(name, type(m)) for name, m in model.named_modules()],
    )


def assert_unchanged(model: nn.Module, before) -> None:
    state, modules = before
    assert [(name, type(m)) for name, m in model.named_modules()] == modules
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(method="srste", sparsity={"ff": "0:4"}), "N must be >= 1"),
        (dict(method="srste", sparsity={"ff": "5:4"}), "N must be <= M"),
        (dict(method="srste", sparsity={"ff": "1-16"}), "malformed"),
        (dict(method="sr-ste", sparsity={"ff": "1:16"}), "unknown method 'sr-ste'"),
        (dict(method="srste", sparsity={"mlp": "1:16"}), "unknown role 'mlp'"),
        (dict(method="srste", sparsity={"re:(": "1:16"}), "invalid regular expression"),
        (dict(method="srste", sparsity={}), "at least one target"),
        (dict(method="srste", sparsity={"q": "1:4", "qk": "1:4"}), "both claim"),
        (dict(method="srste", sparsity={"ff": "1:4"}, dense_fraction=-0.1), "dense_fraction"),
        (dict(method="srste", sparsity={"ff": "1:4"}, finetune_fraction=1.5), "finetune_fraction"),
        (dict(method="srste", sparsity={"ff": "1:4"}, dense_fraction=0.6, finetune_fraction=0.5), "exceed 1"),
        (dict(method="srste", sparsity={"ff": "1:4"}, dense_fraction=0.1, dense_steps=5), "not both"),
        (dict(method="srste", sparsity={"ff": "1:4"}, beta=0.1), "beta only applies"),
        (dict(method="mdgf-exp", sparsity={"ff": "1:4"}, beta=-1.0), "beta must be"),
        (dict(method="mdgf-exp", sparsity={"ff": "1:4"}, beta=0.1, decay_end_fraction=0.5), "not beta and decay_end"),
        (dict(method="mdgf-exp", sparsity={"ff": "1:4"}, decay_fraction=0.2, decay_end_fraction=0.5), "give one of"),
        (dict(method="mdgf-linear", sparsity={"ff": "1:4"}, decay_fraction=0.0), "decay_fraction must be"),
        (dict(method="sdgf-stepwise", sparsity={"ff": "1:4"}, decay_fraction=0.2), "decay_fraction only applies"),
        (dict(method="sdgf-geometric", sparsity={"ff": "1:4"}, geometric_k=12), "power of two"),
        (dict(method="ste", sparsity={"ff": "1:4"}, patterns=["2:4", "1:4"]), "patterns only apply"),
        (dict(method="sdgf-stepwise", sparsity={"ff": "1:4"}, patterns=["4:8", "2:8"]), "must end at its target"),
        (dict(method="sdgf-stepwise", sparsity={"ff": "1:4"}, patterns="geometric"), "already walks"),
    ],
)
def test_bad_recipes_are_refused_on_construction(kwargs, message):
    with pytest.raises(nmflow.ConfigError, match=message):
        nmflow.Recipe(**kwargs)


def test_unknown_config_keys_are_named():
    with pytest.raises(nmflow.ConfigError, match="dense_frac"):
        nmflow.Recipe.from_dict({"method": "ste", "sparsity": {"ff": "1:4"}, "dense_frac": 0.1})


def test_recipe_round_trips_through_a_plain_dict():
    recipe = nmflow.Recipe("sdgf-stepwise", {"ff": "1:4", "qk": "2:4"}, patterns={"ff": ["2:4", "1:4"]}, beta=None)
    assert nmflow.Recipe.from_dict(recipe.to_dict()) == recipe


@pytest.mark.parametrize(
    "recipe,total_steps,error,message",
    [
        (nmflow.Recipe("ste", {"ff": "1:4"}), 0, nmflow.ConfigError, "total_steps"),
        (nmflow.Recipe("ste", {"ff": "1:4"}), 2.5, nmflow.ConfigError, "total_steps"),
        (nmflow.Recipe("ste", {"ff": "1:4"}, dense_steps=8, finetune_steps=8), 10, nmflow.ConfigError, "exceed"),
        (nmflow.Recipe("ste", {"attn_out": "1:4", "re:nothing": "1:4"}), 10, nmflow.NoMatchingTargetError, "nothing"),
        (nmflow.Recipe("ste", {"re:.*norm1": "1:4"}), 10, nmflow.ConfigError, "LayerNorm"),
        (nmflow.Recipe("sdgf-stepwise", {"ff": "3:8"}), 10, nmflow.ConfigError, "SDGF-stepwise"),
        (nmflow.Recipe("ste", {"ff": "1:16"}), 10, nmflow.ConfigError, r"layers\.0\.linear2"),
        (nmflow.Recipe("mdgf-exp", {"ff": "1:4"}, dense_fraction=0.8, decay_end_fraction=0.5), 10, None, "decay"),
    ],
)
def test_bad_applications_leave_the_model_untouched(recipe, total_steps, error, message):
    model = tiny_encoder(dim_ff=24)  # linear2's input (24) is not a multiple of 16
    before = snapshot(model)
    with pytest.raises(error or nmflow.ConfigError, match=message):
        nmflow.sparsify(model, recipe, total_steps=total_steps, verbose=False)
    assert_unchanged(model, before)


def test_a_role_that_matches_nothing_is_named():
    model = nn.Sequential(OrderedDict(fc=nn.Linear(8, 8)))
    with pytest.raises(nmflow.NoMatchingTargetError, match="'attn_out'"):
        nmflow.sparsify(model, nmflow.Recipe("ste", {"attn_out": "1:4"}), total_steps=10, verbose=False)


def test_indivisible_layers_can_be_skipped_with_a_warning():
    model = tiny_encoder(dim_ff=24)
    recipe = nmflow.Recipe("ste", {"ff": "1:16"}, skip_indivisible=True)
    with pytest.warns(UserWarning, match=r"layers\.0\.linear2"):
        sp = nmflow.sparsify(model, recipe, total_steps=10, verbose=False)
    assert [t.name for t in sp.targets] == ["layers.0.linear1", "layers.1.linear1"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_at_mask_time_name_the_layer(bad):
    model = tiny_encoder()
    with torch.no_grad():
        model.layers[1].linear1.weight[0, 0] = bad
    before = snapshot(model)
    with pytest.raises(nmflow.NonFiniteWeightError, match=r"layers\.1\.linear1"):
        nmflow.sparsify(model, nmflow.Recipe("ste", {"ff": "1:4"}, dense_steps=0), total_steps=10, verbose=False)
    before_state, modules = before
    assert [(name, type(m)) for name, m in model.named_modules()] == modules
    after = model.state_dict()
    assert all(torch.equal(after[k].nan_to_num(), v.nan_to_num()) for k, v in before_state.items())


def test_non_finite_weights_stop_step_without_advancing():
    model = tiny_encoder()
    sp = nmflow.sparsify(model, nmflow.Recipe("ste", {"ff": "1:4"}, dense_steps=1), total_steps=10, verbose=False)
    with torch.no_grad():
        model.layers[0].linear2.parametrizations.weight.original[2, 3] = float("nan")
    with pytest.raises(nmflow.NonFiniteWeightError, match=r"layers\.0\.linear2"):
        sp.step()
    assert sp.step_count == 0


def test_sparsifying_twice_is_refused_and_changes_nothing():
    model = tiny_encoder()
    nmflow.sparsify(model, nmflow.Recipe("ste", {"ff": "1:4"}), total_steps=10, verbose=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(nmflow.ConfigError, match="already parametrized"):
        nmflow.sparsify(model, nmflow.Recipe("ste", {"ff": "1:4", "qkv": "1:4"}), total_steps=10, verbose=False)
    assert not parametrize.is_parametrized(model.layers[0].self_attn)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_use_after_finalize_is_refused():
    model = tiny_encoder()
    sp = nmflow.sparsify(model, nmflow.Recipe("ste", {"ff": "1:4"}), total_steps=10, verbose=False)
    sp.finalize()
    with pytest.raises(nmflow.FinalizedError):
        sp.step()
    with pytest.raises(nmflow.FinalizedError):
        sp.finalize()


def test_sparsify_needs_a_recipe():
    with pytest.raises(nmflow.ConfigError, match="Recipe"):
        nmflow.sparsify(tiny_encoder(), {"method": "ste"}, total_steps=10)
