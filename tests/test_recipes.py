"""Each recipe's forward weight and weight gradient, checked against a hand computation at every phase."""

import math
from collections import OrderedDict

import pytest
import torch
from reference import reference_mask
from torch import nn

import nmflow

T, DENSE, FINETUNE = 20, 2, 4  # dense: steps 0-1, sparse: 2-15, finetune: 16-
TARGET = (1, 4)
LAMBDA = 0.05  # large, so the SR-STE term is visible next to the task gradient

# SDGF walks over the 14-step sparse window, written out by hand.
STEPWISE_1_4 = {**dict.fromkeys(range(2, 7), (3, 4)), **dict.fromkeys(range(7, 12), (2, 4))}  # then 1:4
GEOMETRIC_1_4_K4 = {**dict.fromkeys(range(2, 7), (4, 16)), **dict.fromkeys(range(7, 12), (2, 8))}


def expected_state(method: str, t: int) -> tuple[tuple[int, int] | None, float | None]:
    """(pattern or None for dense, D or None for binary) at step t, from the paper's definitions."""
    if method == "dense" or t < DENSE:
        return None, None
    if t >= T - FINETUNE:
        return TARGET, None
    j = t - DENSE
    if method == "mdgf-linear":
        return TARGET, max(1 - 0.1 * j, 0.0)
    if method == "mdgf-exp":
        return TARGET, math.exp(-0.3 * j)
    if method == "sdgf-stepwise":
        return STEPWISE_1_4.get(t, TARGET), None
    if method == "sdgf-geometric":
        return GEOMETRIC_1_4_K4.get(t, TARGET), None
    return TARGET, None  # ste, srste, oneshot


def make_recipe(method: str) -> nmflow.Recipe:
    extra = {"mdgf-linear": {"beta": 0.1}, "mdgf-exp": {"beta": 0.3}, "sdgf-geometric": {"geometric_k": 4}}
    return nmflow.Recipe(
        method,
        {"re:fc": f"{TARGET[0]}:{TARGET[1]}"},
        dense_steps=DENSE,
        finetune_steps=FINETUNE,
        srste_lambda=LAMBDA,
        **extra.get(method, {}),
    )


@pytest.mark.parametrize("method", nmflow.METHODS)
@pytest.mark.parametrize("t", [0, 1, 2, 3, 5, 7, 9, 11, 15, 16, 19, 20, 25])
def test_forward_weight_and_gradient_match_the_definition(method, t):
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(16, 6)))
    weight = model.fc.weight.detach().clone()
    sp = nmflow.sparsify(model, make_recipe(method), total_steps=T, verbose=False)
    for _ in range(t):
        sp.step()  # no training in between: the weights stay as initialised
    x, r = torch.randn(5, 16), torch.randn(5, 6)
    (model(x) * r).sum().backward()

    pattern, decay = expected_state(method, t)
    status = sp.status()
    assert status.step == t
    assert status.decay == (pytest.approx(decay) if decay is not None else None)
    assert list(status.by_layer.values()) == ["dense" if pattern is None else f"{pattern[0]}:{pattern[1]}"]

    if pattern is None:
        mask = torch.ones_like(weight, dtype=torch.bool)
    elif method == "oneshot":  # frozen at the end of the dense phase: same weights, so the same target mask
        mask = reference_mask(weight, *TARGET, dim=1)
    else:
        mask = reference_mask(weight, *pattern, dim=1)
    factor = mask.float() + (decay or 0.0) * (~mask).float()
    expected_weight = weight * factor
    task_grad = r.T @ x  # dL/dW_eff for L = sum(r * (x W_eff^T + b))
    if pattern is not None and method == "srste":
        expected_grad = task_grad + LAMBDA * (~mask).float() * weight
    elif pattern is not None and method == "oneshot":
        expected_grad = task_grad * mask.float()
    else:
        expected_grad = task_grad  # straight-through: not scaled by the mask or D

    weight_grad = model.fc.parametrizations.weight.original.grad if method != "dense" else model.fc.weight.grad
    torch.testing.assert_close(model.fc.weight.detach(), expected_weight)
    torch.testing.assert_close(weight_grad, expected_grad)
    torch.testing.assert_close(model.fc.bias.grad, r.sum(0))  # biases stay in and train


def test_oneshot_mask_is_frozen_while_weights_move():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(16, 6)))
    sp = nmflow.sparsify(model, make_recipe("oneshot"), total_steps=T, verbose=False)
    sp.step()
    sp.step()  # t = 2: the mask is taken now
    frozen = reference_mask(model.fc.parametrizations.weight.original.detach(), *TARGET, dim=1)
    with torch.no_grad():  # reverse the magnitude order completely
        model.fc.parametrizations.weight.original.copy_(1.0 / model.fc.parametrizations.weight.original)
    sp.step()
    assert torch.equal(model.fc.weight != 0, frozen & (model.fc.parametrizations.weight.original != 0))


def test_masks_follow_the_weights_every_forward():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(16, 6)))
    nmflow.sparsify(model, nmflow.Recipe("ste", {"re:fc": "1:4"}, dense_steps=0), total_steps=10, verbose=False)
    original = model.fc.parametrizations.weight.original
    with torch.no_grad():
        original.copy_(torch.randn_like(original))
    assert torch.equal(model.fc.weight != 0, reference_mask(original.detach(), 1, 4, dim=1))


def test_default_decay_takes_a_quarter_of_the_run_after_the_dense_phase():
    plain = dict(sparsity={"ff": "1:8"}, dense_steps=10, finetune_steps=10)
    linear = nmflow.Recipe("mdgf-linear", **plain)
    exp = nmflow.Recipe("mdgf-exp", **plain)
    # 25 of 100 steps from step 10: D reaches 0 (linear) or 0.01 (exponential) at step 35
    assert linear.resolved_beta(100) == pytest.approx(1 / 25)
    assert exp.resolved_beta(100) == pytest.approx(math.log(100) / 25)
    # spelled out, so a saved recipe keeps its decay if the default moves; nothing to spell out otherwise
    assert nmflow.Recipe.from_dict(exp.to_dict()).decay_fraction == 0.25
    assert nmflow.Recipe("mdgf-exp", **plain, beta=0.1).decay_fraction is None
    assert nmflow.Recipe("srste", **plain).decay_fraction is None
    # any dense phase leaves room for it: the default never ends the decay before the dense phase does
    late = nmflow.Recipe("mdgf-exp", {"ff": "1:8"}, dense_fraction=0.6, finetune_fraction=0.1)
    assert late.resolved_beta(100) == pytest.approx(math.log(100) / 25)
    longer = nmflow.Recipe("mdgf-linear", **plain, decay_fraction=0.5)
    assert longer.resolved_beta(100) == pytest.approx(1 / 50)


@pytest.mark.parametrize("total_steps", [400, 1000, 2000, 4000])
def test_the_default_decay_is_the_30_percent_end_the_evidence_runs_used(total_steps):
    # docs/results/defaults and docs/results/scale chose it as decay_end_fraction=0.3 at these run lengths
    for method in ("mdgf-exp", "mdgf-linear"):
        measured = nmflow.Recipe(method, {"ff": "1:32"}, decay_end_fraction=0.3).resolved_beta(total_steps)
        assert nmflow.Recipe(method, {"ff": "1:32"}).resolved_beta(total_steps) == measured


def test_decay_end_fraction_ends_the_decay_at_that_fraction_of_the_run():
    plain = dict(sparsity={"ff": "1:8"}, dense_steps=10, finetune_steps=10)
    assert nmflow.Recipe("mdgf-linear", **plain, decay_end_fraction=0.7).resolved_beta(100) == pytest.approx(1 / 60)
    custom = nmflow.Recipe("mdgf-exp", **plain, decay_end_fraction=0.5, decay_end_value=0.001)
    assert custom.resolved_beta(100) == pytest.approx(math.log(1000) / 40)


def test_combined_decay_and_pattern_walk():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(16, 6)))
    recipe = nmflow.Recipe(
        "mdgf-exp", {"re:fc": "1:4"}, dense_steps=DENSE, finetune_steps=FINETUNE, beta=0.3, patterns="stepwise"
    )
    sp = nmflow.sparsify(model, recipe, total_steps=T, verbose=False)
    weight = model.fc.weight.detach().clone()
    for _ in range(8):
        sp.step()
    decay = math.exp(-0.3 * 6)
    mask = reference_mask(weight, *STEPWISE_1_4[8], dim=1)
    torch.testing.assert_close(model.fc.weight.detach(), weight * (mask.float() + decay * (~mask).float()))
    assert sp.status().by_layer == {"fc": "2:4"}


def test_explicit_pattern_sequence():
    model = nn.Sequential(OrderedDict(fc=nn.Linear(16, 6)))
    recipe = nmflow.Recipe(
        "sdgf-stepwise", {"re:fc": "1:4"}, dense_steps=0, finetune_steps=0, patterns=["8:16", "2:8", "1:4"]
    )
    sp = nmflow.sparsify(model, recipe, total_steps=6, verbose=False)
    seen = []
    for _ in range(7):
        seen.append(sp.status().by_layer["fc"])
        sp.step()
    assert seen == ["8:16", "8:16", "2:8", "2:8", "1:4", "1:4", "1:4"]


def test_finalize_writes_exact_zeros_and_leaves_plain_modules():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(16, 6)))
    param = model.fc.weight
    sp = nmflow.sparsify(model, make_recipe("mdgf-exp"), total_steps=T, verbose=False)
    sp.step()
    sp.step()
    weight = param.detach().clone()
    sp.finalize()
    assert type(model.fc) is nn.Linear and model.fc.weight is param  # the optimizer's tensor is still the one
    assert torch.equal(model.fc.weight.detach(), weight * reference_mask(weight, *TARGET, dim=1))
    with pytest.raises(nmflow.FinalizedError):
        sp.step()


def test_verify_reports_each_segment_and_catches_a_broken_pattern():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    recipe = nmflow.Recipe("ste", {"ff": "1:4", "qk": "1:8"}, dense_steps=1)
    sp = nmflow.sparsify(model, recipe, total_steps=4, verbose=False)
    with pytest.raises(nmflow.NmflowError, match="finalize"):
        sp.verify()
    assert sp.status().by_key == {"qk": "dense", "ff": "dense"}
    assert sp.status().density == {"qk": 1.0, "ff": 1.0}
    for _ in range(4):
        sp.step()
    assert sp.status().by_key == {"qk": "1:8", "ff": "1:4"}
    assert sp.status().density == {"qk": 1 / 8, "ff": 1 / 4}
    sp.finalize()
    records = {r["layer"]: r for r in sp.verify()}
    attn = "layers.0.self_attn.in_proj_weight[qk]"
    assert set(records) == {attn, "layers.0.linear1", "layers.0.linear2"}
    assert records[attn]["realized"] == "1:8" and records[attn]["kept"] == 32 * 16 // 8
    assert records["layers.0.linear2"] == dict(
        layer="layers.0.linear2", key="ff", role="ff", target="1:4", realized="1:4", kept=16 * 32 // 4, total=16 * 32
    )
    with torch.no_grad():
        model.layers[0].linear1.weight.fill_(1.0)
    with pytest.raises(nmflow.NmflowError, match=r"layers\.0\.linear1 should be 1:4"):
        sp.verify()


def test_finalize_writes_positive_zeros():
    model = nn.Sequential(OrderedDict(fc=nn.Linear(8, 4)))
    with torch.no_grad():
        model.fc.weight.fill_(-1.0)
    sp = nmflow.sparsify(model, nmflow.Recipe("ste", {"re:fc": "1:4"}, dense_steps=0), total_steps=2, verbose=False)
    sp.finalize()
    pruned = model.fc.weight[model.fc.weight == 0]
    assert pruned.numel() == 24 and not torch.signbit(pruned).any()
