"""N:M masks against a plain-Python reference: keep the n largest |w| per group, lower index first on ties."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_mask

import nmflow
from nmflow.core.masks import NMPattern, compute_mask


@st.composite
def weights_and_patterns(draw):
    m = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 16, 32, 64, 128]))
    n = draw(st.integers(1, m))
    groups = draw(st.integers(1, 4))
    rows = draw(st.integers(1, 5))
    layout = draw(st.sampled_from(["linear", "conv1d", "conv2d"]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    # few distinct values, zeros and negatives, so ties are common
    values = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -2.0, 3.25]) | st.floats(-4, 4, width=16)
    shape, dim = {"linear": ((rows, groups * m), 1), "conv1d": ((groups * m, rows), 0)}.get(
        layout, ((rows, groups * m, 2, 1), 1)
    )
    numel = 1
    for s in shape:
        numel *= s
    data = draw(st.lists(values, min_size=numel, max_size=numel))
    return torch.tensor(data, dtype=dtype).reshape(shape), n, m, dim


@settings(max_examples=300, deadline=None)
@given(weights_and_patterns())
def test_mask_matches_reference_and_keeps_exactly_n(case):
    weight, n, m, dim = case
    mask = nmflow.nm_mask(weight, n, m, dim=dim)
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    assert torch.equal(mask, reference_mask(weight, n, m, dim))
    per_group = mask.movedim(dim, -1).reshape(-1, m).sum(-1)
    assert torch.all(per_group == n)


@pytest.mark.parametrize(
    "n,m", [(1, 4), (2, 4), (3, 4), (1, 16), (2, 16), (4, 16), (8, 16), (15, 16), (5, 8), (16, 128), (3, 64)]
)
def test_all_equal_and_all_zero_groups_keep_the_first_n(n, m):
    for fill in (0.0, -1.5):
        mask = nmflow.nm_mask(torch.full((3, 2 * m), fill), n, m)
        expected = torch.zeros(3, 2, m, dtype=torch.bool)
        expected[..., :n] = True
        assert torch.equal(mask, expected.reshape(3, 2 * m))


def test_all_selection_paths_agree_with_the_reference_on_random_weights():
    # n=1 (max), pairwise ranks (m <= 8), drop one (n = m-1), a few max passes, threshold (m >= 64), stable sort
    torch.manual_seed(0)
    weight = torch.randn(16, 256)
    cases = [(1, 16), (2, 4), (3, 8), (7, 8), (15, 16), (2, 16), (4, 32), (16, 256), (5, 64), (4, 16), (8, 16), (7, 32)]
    for n, m in cases:
        assert torch.equal(compute_mask(weight, NMPattern(n, m), 1), reference_mask(weight, n, m, 1)), (n, m)


def test_groups_never_straddle_rows():
    weight = torch.arange(1.0, 9.0).reshape(2, 4)  # row 0: 1..4, row 1: 5..8
    assert nmflow.nm_mask(weight, 1, 4).tolist() == [[False, False, False, True], [False, False, False, True]]


@pytest.mark.parametrize(
    "n,m,shape,dim,message",
    [
        (0, 4, (2, 8), 1, "N must be >= 1"),
        (5, 4, (2, 8), 1, "N must be <= M"),
        (1, 3, (2, 8), 1, "does not divide"),
        (1, 4, (2, 8), 2, "not a dimension"),
    ],
)
def test_bad_arguments_raise_clear_errors(n, m, shape, dim, message):
    with pytest.raises(nmflow.ConfigError, match=message):
        nmflow.nm_mask(torch.randn(shape), n, m, dim=dim)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_rejected(bad):
    weight = torch.randn(2, 8)
    weight[1, 3] = bad
    with pytest.raises(nmflow.NonFiniteWeightError):
        nmflow.nm_mask(weight, 1, 4)


def test_integer_weights_are_rejected():
    with pytest.raises(nmflow.ConfigError, match="floating-point"):
        nmflow.nm_mask(torch.ones(2, 4, dtype=torch.int64), 1, 4)


@pytest.mark.parametrize("text", ["1-16", "0:4", "5:4", "a:b", "1:", ":4", "1:16:2", ""])
def test_malformed_patterns_are_rejected(text):
    with pytest.raises(nmflow.ConfigError):
        NMPattern.parse(text)


def test_pattern_parsing():
    assert NMPattern.parse(" 1 : 16 ") == NMPattern(1, 16)
    assert NMPattern.parse((2, 4)) == NMPattern(2, 4)
    assert str(NMPattern(1, 32)) == "1:32"


def test_realized_n_counts_the_densest_group():
    weight = torch.tensor([[1.0, 0.0, 0.0, 0.0, 2.0, 3.0, 0.0, 0.0]])
    assert nmflow.realized_n(weight, 4) == 2
    assert nmflow.is_nm(weight, 2, 4) and not nmflow.is_nm(weight, 1, 4)
