"""Phase boundaries, MDGF decays and SDGF pattern walks as pure functions of the step."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import nmflow
from nmflow.core.masks import NMPattern
from nmflow.core.schedules import Phase, PhasePlan, geometric_patterns, stepwise_patterns


def P(text):
    return NMPattern.parse(text)


@pytest.mark.parametrize(
    "target,expected",
    [
        ("2:4", ["3:4", "2:4"]),
        ("1:4", ["3:4", "2:4", "1:4"]),
        ("1:8", ["7:8", "4:8", "2:8", "1:8"]),
        ("1:16", ["15:16", "8:16", "4:16", "2:16", "1:16"]),
        ("1:32", ["31:32", "16:32", "8:32", "4:32", "2:32", "1:32"]),
        ("2:8", ["7:8", "4:8", "2:8"]),
        ("1:2", ["1:2"]),
    ],
)
def test_stepwise_sequences_from_the_paper(target, expected):
    assert [str(p) for p in stepwise_patterns(P(target))] == expected


def test_stepwise_1_128_has_eight_intervals():
    assert len(stepwise_patterns(P("1:128"))) == 8


@pytest.mark.parametrize("target", ["3:8", "1:6", "4:4", "1:3"])
def test_stepwise_sequences_that_cannot_be_formed(target):
    with pytest.raises(nmflow.ConfigError, match="SDGF-stepwise"):
        stepwise_patterns(P(target))


def test_geometric_sequence_from_the_paper():
    assert [str(p) for p in geometric_patterns(P("1:8"), 16, 768)] == ["16:128", "8:64", "4:32", "2:16", "1:8"]


def test_geometric_block_is_capped_by_the_input_dimension():
    # 16 * 16 = 256 does not divide 64; the largest block that does is 4 * 16 = 64
    assert [str(p) for p in geometric_patterns(P("1:16"), 16, 64)] == ["4:64", "4:64", "4:64", "2:32", "1:16"]


def test_phase_boundaries():
    plan = PhasePlan(total_steps=10, dense_steps=2, finetune_steps=3)
    phases = [plan.phase(t) for t in range(14)]
    assert phases == [Phase.DENSE] * 2 + [Phase.SPARSE] * 5 + [Phase.FINETUNE] * 7


@given(
    total=st.integers(1, 300),
    dense=st.floats(0, 1),
    finetune=st.floats(0, 1),
    count=st.integers(1, 9),
)
def test_phases_and_intervals_partition_the_run(total, dense, finetune, count):
    if dense + finetune > 1:
        return
    recipe = nmflow.Recipe("sdgf-stepwise", {"ff": "1:4"}, dense_fraction=dense, finetune_fraction=finetune)
    plan = recipe.phase_plan(total)
    phases = [plan.phase(t) for t in range(total)]
    assert phases.count(Phase.DENSE) == plan.dense_steps == round(dense * total)
    assert phases.count(Phase.FINETUNE) == plan.finetune_steps
    assert phases == sorted(phases, key=[Phase.DENSE, Phase.SPARSE, Phase.FINETUNE].index)
    window = [plan.interval(t, count) for t in range(total) if phases[t] is Phase.SPARSE]
    if window:
        assert window == sorted(window) and window[0] == 0
        sizes = [window.count(i) for i in range(count)]
        if len(window) >= count:  # evenly split: interval lengths differ by at most one, and the last is reached
            assert max(sizes) - min(sizes) <= 1 and window[-1] == count - 1
    assert plan.phase(total + 5) is Phase.FINETUNE  # past the end: the final binary state


def test_mdgf_decay_values():
    plan = dict(sparsity={"ff": "1:8"}, dense_steps=4, finetune_steps=2)
    linear = nmflow.Recipe("mdgf-linear", beta=0.25, **plan).decay_schedule(20)
    exp = nmflow.Recipe("mdgf-exp", beta=0.1, **plan).decay_schedule(20)
    assert [linear(j) for j in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert exp(0) == 1.0 and exp(7) == pytest.approx(math.exp(-0.7))


def test_status_reports_phase_decay_and_patterns_over_a_run():
    from collections import OrderedDict

    from torch import nn

    model = nn.Sequential(OrderedDict(fc=nn.Linear(8, 8)))
    recipe = nmflow.Recipe("mdgf-linear", {"re:fc": "1:4"}, dense_steps=1, finetune_steps=1, beta=0.5)
    sp = nmflow.sparsify(model, recipe, total_steps=5, verbose=False)
    seen = []
    for _ in range(6):
        s = sp.status()
        seen.append((s.step, str(s.phase), s.decay, s.by_layer["fc"]))
        sp.step()
    assert seen == [
        (0, "dense", None, "dense"),
        (1, "sparse", 1.0, "1:4"),
        (2, "sparse", 0.5, "1:4"),
        (3, "sparse", 0.0, "1:4"),
        (4, "finetune", None, "1:4"),
        (5, "finetune", None, "1:4"),
    ]


@pytest.mark.parametrize(
    "method,sparsity",
    [
        ("sdgf-stepwise", {"ff": "1:16", "qk": "1:8"}),
        ("sdgf-geometric", {"ff": "1:4"}),
        ("mdgf-linear", {"ff": "1:4", "qk": "1:2"}),
        ("mdgf-exp", {"ff": "1:4"}),
        ("oneshot", {"ff": "1:4"}),
        ("dense", {"ff": "1:4"}),
    ],
)
def test_schedule_state_count_matches_a_walk_over_every_step(method, sparsity):
    from helpers import TimmStyleViT

    sp = nmflow.sparsify(
        TimmStyleViT(depth=1),
        nmflow.Recipe(method, sparsity, dense_steps=3, finetune_steps=5),
        total_steps=37,
        verbose=False,
    )
    seen = set()
    for _ in range(40):
        status = sp.status()
        seen.add((tuple(status.by_layer.values()), bool(status.decay)))
        sp.step()
    assert sp.schedule_states() == len(seen)


@pytest.mark.parametrize("method", ["mdgf-exp", "sdgf-stepwise", "oneshot"])
def test_reschedule_before_the_first_step_equals_a_fresh_plan(method):
    from helpers import TimmStyleViT

    def walk(sp):
        seen = []
        for _ in range(sp.total_steps):
            status = sp.status()
            seen.append((status.phase, status.decay, tuple(status.by_layer.values())))
            sp.step()
        return seen

    recipe = nmflow.Recipe(method, {"ff": "1:8"})
    torch.manual_seed(0)
    rescheduled = nmflow.sparsify(TimmStyleViT(depth=1), recipe, total_steps=1000, verbose=False)
    rescheduled.reschedule(40)
    torch.manual_seed(0)
    fresh = nmflow.sparsify(TimmStyleViT(depth=1), recipe, total_steps=40, verbose=False)
    assert rescheduled.table == fresh.table
    assert walk(rescheduled) == walk(fresh)
    with pytest.raises(nmflow.NmflowError, match="before the first step"):
        rescheduled.reschedule(50)
