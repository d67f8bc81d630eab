"""Conversion of finalized 2:4-compatible weights to torch's semi-structured sparse format."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import nmflow
from nmflow.core.errors import ConfigError
from nmflow.semi_structured import convert, is_two_four_valid, plan


def finalized_mlp(pattern: str, dtype=torch.float16, hidden=128) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
    sp = nmflow.sparsify(model, nmflow.Recipe("ste", {"re:0|2": pattern}), total_steps=10, verbose=False)
    sp.finalize()
    return model.to(dtype)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 4), log_m=st.integers(2, 4), rows=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_two_four_validity_matches_the_nonzeros_per_group_of_four(n, log_m, rows, seed):
    m = 2**log_m
    n = min(n, m)
    weight = torch.randn(rows, 2 * m, generator=torch.Generator().manual_seed(seed))
    weight = weight * nmflow.nm_mask(weight, n, m)
    expected = nmflow.realized_n(weight, 4, dim=1) <= 2  # independent: the N of the groups of 4
    assert is_two_four_valid(weight) == expected
    if n <= 2:
        assert is_two_four_valid(weight)  # N:M with N <= 2 and 4 | M is always 2:4-valid (3:8 need not be)


def test_plan_says_why_each_layer_is_or_is_not_convertible():
    model = finalized_mlp("1:8")
    model.append(nn.Linear(128, 48).half())  # 48 rows: not a multiple of 32, and dense
    conv = Conv1D(64, 128)
    model.append(conv)
    verdicts = {c.name: (c.convertible, c.reason) for c in plan(model)}
    assert verdicts["0"] == (True, "2:4-valid") and verdicts["2"] == (True, "2:4-valid")
    assert "shape (48, 128)" in verdicts["3"][1]
    assert "Conv1D" in verdicts["4"][1]
    assert not plan(finalized_mlp("1:8", dtype=torch.float32))[0].convertible  # fp32: convert to half first
    dense = nn.Sequential(nn.Linear(128, 128).half())
    assert plan(dense)[0].reason.startswith("not 2:4-valid")
    assert plan(finalized_mlp("3:4"))[0].reason.startswith("not 2:4-valid")


def test_a_model_still_being_sparsified_is_refused():
    model = nn.Sequential(nn.Linear(128, 128))
    nmflow.sparsify(model, nmflow.Recipe("ste", {"re:0": "1:8"}), total_steps=10, verbose=False)
    assert "finalize()" in plan(model)[0].reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_convert_off_gpu_names_the_layers_and_changes_nothing():
    model = finalized_mlp("1:8")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"CUDA GPUs only; 0, 2 are on cpu"):
        convert(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured sparse kernels need a CUDA GPU")
def test_converted_model_computes_the_same_outputs_on_gpu():
    model = finalized_mlp("1:8").cuda()
    x = torch.randn(64, 128, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        expected = model(x)
        converted = convert(model)
        got = model(x)
    assert [c.convertible for c in converted] == [True, True]
    assert type(model[0].weight).__name__.startswith("SparseSemiStructuredTensor")
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
