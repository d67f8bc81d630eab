"""Mixture-of-experts weights under every recipe and tool, packed layouts nmflow cannot establish, partial
blocks, ``exclude=`` and `nmflow.plan`."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import transformers as T
from helpers import nonzeros_per_group
from test_model_families import assert_unchanged, snapshot
from torch import nn

import nmflow
from nmflow import diagnostics, flops, semi_structured

HIDDEN, FFN, EXPERTS, TOP_K = 32, 64, 4, 2


def mixtral() -> nn.Module:
    torch.manual_seed(0)
    config = T.MixtralConfig(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        bos_token_id=0,
        eos_token_id=1,
    )
    return T.MixtralForCausalLM(config)


EXPERT_WEIGHTS = ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj")


def lm_step(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
    ids = torch.randint(2, 64, (2, 6), generator=gen)
    return model(input_ids=ids, labels=ids).loss


def expert_weight(model: nn.Module, name: str) -> torch.Tensor:
    module, _, param = name.rpartition(".")
    return getattr(model.get_submodule(module), param)


# ------------------------------------------------------------------ mixture of experts
@pytest.mark.parametrize("method", [m for m in nmflow.METHODS if m != "dense"])
def test_moe_experts_train_under_every_recipe_finalize_per_expert_and_round_trip(method, tmp_path):
    model = mixtral()
    keys = set(model.state_dict())
    recipe = nmflow.Recipe(method, {"experts": "1:4"}, dense_steps=1, finetune_steps=1)
    sp = nmflow.sparsify(model, recipe, total_steps=4, verbose=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    record = diagnostics.StepDiagnostics(sp, optimizer)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        lm_step(model, gen).backward()
        record.after_backward()
        optimizer.step()
        optimizer.zero_grad()
        sp.step()
        stats = record.after_step()
    assert set(stats["flip_rate"]) == {"experts"}
    sp.finalize()

    assert set(model.state_dict()) == keys
    for name in EXPERT_WEIGHTS:
        weight = expert_weight(model, name).detach()
        assert weight.dim() == 3 and weight.shape[0] == EXPERTS
        for expert in weight:  # every expert is [out, in], grouped along its own input
            assert (nonzeros_per_group(expert, 4, 1) == 1).all(), name
    assert [r["layer"] for r in sp.verify()] == list(EXPERT_WEIGHTS)
    stored = nmflow.save_compressed(model, tmp_path / "moe.safetensors")
    assert stored == dict.fromkeys(EXPERT_WEIGHTS, "1:4")
    loaded = nmflow.load_compressed(tmp_path / "moe.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_experts_beside_ff_take_the_routed_experts_and_ff_the_rest():
    torch.manual_seed(0)
    config = T.Qwen2MoeConfig(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=FFN,
    )
    model = T.Qwen2MoeForCausalLM(config)
    plan = nmflow.plan(model, nmflow.Recipe("ste", {"ff": "2:4", "experts": "1:4"}), 10, verbose=False)

    keys = {t.qualified_name: t.segments[0].key for t in plan.targets}
    shared = {f"model.layers.0.mlp.shared_expert.{p}": "ff" for p in ("gate_proj", "up_proj", "down_proj")}
    assert keys == {**dict.fromkeys(EXPERT_WEIGHTS, "experts"), **shared}  # the routers stay dense


def test_moe_flops_count_each_routed_token_once_per_chosen_expert():
    model = mixtral()
    sp = nmflow.sparsify(model, nmflow.Recipe("ste", {"experts": "1:4"}, dense_steps=0), 4, verbose=False)
    ids = torch.randint(2, 64, (2, 6))
    count = flops.count_inference_flops(model, input_ids=ids, densities=flops.final_densities(sp))

    (row,) = [r for r in count.layers if r.name == "model.layers.0.mlp.experts"]
    pairs = ids.numel() * TOP_K  # every token runs through TOP_K experts
    assert row.kind == "weight" and row.density == 0.25
    assert row.dense == 2 * pairs * (HIDDEN * 2 * FFN + FFN * HIDDEN)  # gate_up then down


def test_semi_structured_plan_lists_expert_weights_as_not_convertible():
    model = mixtral()
    experts = {c.name: c for c in semi_structured.plan(model) if "experts" in c.name}
    assert set(experts) == set(EXPERT_WEIGHTS)
    assert not any(c.convertible for c in experts.values())
    assert all("3-D expert" in c.reason for c in experts.values())


class Experts(nn.Module):
    """3-D expert weights; ``is_transposed`` as transformers' experts say it (None: the module does not say)."""

    def __init__(self, transposed: bool | None) -> None:
        super().__init__()
        shape = (EXPERTS, HIDDEN, FFN) if transposed else (EXPERTS, FFN, HIDDEN)
        self.up = nn.Parameter(torch.randn(shape))
        if transposed is not None:
            self.is_transposed = transposed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.up if getattr(self, "is_transposed", False) else self.up.transpose(1, 2)
        return torch.einsum("th,ehf->tf", x, weight)


class TinyMoe(nn.Module):
    def __init__(self, transposed: bool | None) -> None:
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.experts = Experts(transposed)
        self.mlp.down_proj = nn.Linear(FFN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.down_proj(self.mlp.experts(x))


def test_transposed_experts_are_grouped_along_their_input_dimension():
    torch.manual_seed(0)
    model = TinyMoe(transposed=True)  # [experts, in, out], as GPT-OSS stores them
    sp = nmflow.sparsify(model, nmflow.Recipe("ste", {"experts": "1:4"}, dense_steps=0), 2, verbose=False)
    assert sp.targets[0].in_dim == 1
    model(torch.randn(3, HIDDEN)).sum().backward()
    sp.step()
    sp.finalize()

    for expert in model.mlp.experts.up.detach():  # [in, out]: groups of 4 inputs per output column
        assert (nonzeros_per_group(expert, 4, 0) == 1).all()


def test_experts_of_unknown_orientation_are_refused_by_name_and_can_be_excluded():
    model = TinyMoe(transposed=None)
    before = snapshot(model)
    with pytest.raises(nmflow.ConfigError, match=re.escape("mlp.experts.up")):
        nmflow.sparsify(model, nmflow.Recipe("ste", {"ff": "1:4"}), 4, verbose=False)
    assert_unchanged(model, before)

    sp = nmflow.sparsify(model, nmflow.Recipe("ste", {"ff": "1:4"}, exclude=[r"mlp\.experts"]), 4, verbose=False)
    assert [t.qualified_name for t in sp.targets] == ["mlp.down_proj"]


class LinearExperts(nn.Module):
    """The layout of Mixtral before transformers 5: ``block_sparse_moe.experts.N.w1/w2/w3`` as nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.block_sparse_moe = nn.Module()
        self.block_sparse_moe.gate = nn.Linear(HIDDEN, 2)
        self.block_sparse_moe.experts = nn.ModuleList(nn.Module() for _ in range(2))
        for expert in self.block_sparse_moe.experts:
            expert.w1, expert.w3, expert.w2 = nn.Linear(HIDDEN, FFN), nn.Linear(HIDDEN, FFN), nn.Linear(FFN, HIDDEN)


def test_linear_experts_of_older_layouts_take_the_experts_role():
    plan = nmflow.plan(LinearExperts(), nmflow.Recipe("ste", {"ff": "1:4"}), 4, verbose=False)
    names = {t.name: t.segments[0].role for t in plan.targets}
    assert names == {f"block_sparse_moe.experts.{i}.{w}": "experts" for i in range(2) for w in ("w1", "w2", "w3")}


# ------------------------------------------------------------------ packed layouts nmflow cannot establish
def neox() -> nn.Module:
    torch.manual_seed(0)
    config = T.GPTNeoXConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=1, num_attention_heads=4
    )
    return T.GPTNeoXForCausalLM(config)


def test_a_packed_projection_of_unknown_layout_refuses_sub_roles_but_takes_the_whole_tensor():
    model = neox()
    model.config.model_type = "a-fork-of-neox"  # same module names, layout no longer established
    qkv = "gpt_neox.layers.0.attention.query_key_value"
    before = snapshot(model)
    for key in ("q", "qk", "v"):
        with pytest.raises(nmflow.ConfigError, match=re.escape(qkv)):
            nmflow.sparsify(model, nmflow.Recipe("ste", {key: "1:4"}), 4, verbose=False)
        assert_unchanged(model, before)

    plan = nmflow.plan(model, nmflow.Recipe("ste", {"qkv": "1:4"}), 4, verbose=False)
    (target,) = plan.targets
    assert target.name == qkv and target.fully_covered and target.segments[0].role == "qkv"


class NanoGPTAttention(nn.Module):
    """nanoGPT's ``c_attn``: a Linear whose output is [Q | K | V] (``split(n_embd, dim=2)``), no HF config."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(HIDDEN, 3 * HIDDEN)


def test_nanogpt_c_attn_without_a_config_is_split_in_thirds():
    plan = nmflow.plan(NanoGPTAttention(), nmflow.Recipe("ste", {"k": "1:4"}), 4, verbose=False)
    ((seg,),) = [t.segments for t in plan.targets]
    assert (seg.start, seg.stop, seg.groups) == (HIDDEN, 2 * HIDDEN, 1)


# ------------------------------------------------------------------ partial blocks and exclude=
class MlpWithAnExtra(nn.Module):
    """An MLP whose third projection matches no role: ``ff`` alone would leave it dense."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(HIDDEN, FFN), nn.Linear(FFN, HIDDEN)
        self.mlp.mystery_proj = nn.Linear(HIDDEN, FFN)


def test_a_role_that_takes_part_of_a_block_warns_about_the_rest():
    with pytest.warns(UserWarning, match=re.escape("mlp.mystery_proj")):
        sp = nmflow.sparsify(MlpWithAnExtra(), nmflow.Recipe("ste", {"ff": "1:4"}), 4, verbose=False)
    assert {t.name for t in sp.targets} == {"mlp.fc1", "mlp.fc2"}

    recipes = (
        nmflow.Recipe("ste", {"ff": "1:4"}, exclude=[r"mlp\.mystery_proj"]),  # left dense on purpose
        nmflow.Recipe("ste", {"ff": "1:4", r"re:mlp\.mystery_proj": "1:4"}),  # or named
    )
    for recipe, taken in zip(recipes, ({"mlp.fc1", "mlp.fc2"}, {"mlp.fc1", "mlp.fc2", "mlp.mystery_proj"})):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            plan = nmflow.plan(MlpWithAnExtra(), recipe, 4, verbose=False)
        assert {t.name for t in plan.targets} == taken


def test_exclude_leaves_the_named_layers_dense_and_must_name_something():
    model = neox()
    keep = "gpt_neox.layers.0.mlp.dense_4h_to_h"
    plan = nmflow.plan(model, nmflow.Recipe("ste", {"ff": "1:4"}, exclude=[re.escape(keep)]), 4, verbose=False)
    assert [t.name for t in plan.targets] == ["gpt_neox.layers.0.mlp.dense_h_to_4h"]

    with pytest.raises(nmflow.NoMatchingTargetError, match="no_such"):
        nmflow.plan(model, nmflow.Recipe("ste", {"ff": "1:4"}, exclude=["no_such.*"]), 4, verbose=False)
    with pytest.raises(nmflow.ConfigError, match="exclude"):
        nmflow.Recipe("ste", {"ff": "1:4"}, exclude=["("])
    with pytest.raises(nmflow.ConfigError, match="exclude"):
        nmflow.Recipe("ste", {"ff": "1:4"}, exclude="mlp")  # a string, not a list of them
    recipe = nmflow.Recipe("ste", {"ff": "1:4"}, exclude=[keep])
    assert nmflow.Recipe.from_dict(recipe.to_dict()) == recipe
    assert recipe.to_dict()["exclude"] == [keep]


# ------------------------------------------------------------------ plan
def test_plan_prints_what_sparsify_would_take_and_leaves_the_model_unchanged(capsys):
    model = neox()
    recipe = nmflow.Recipe("mdgf-exp", {"ff": "1:4", "qk": "2:4"})
    before = snapshot(model)
    plan = nmflow.plan(model, recipe, 100)
    printed = capsys.readouterr().out
    assert_unchanged(model, before)

    sp = nmflow.sparsify(model, recipe, 100)
    assert printed == capsys.readouterr().out == plan.table + "\n" == sp.table + "\n"
    assert [t.qualified_name for t in plan.targets] == [t.qualified_name for t in sp.targets]
    assert "0:16 of 4x24" in plan.table  # Q and K of every head of NeoX's packed projection


def test_flops_densities_of_a_partly_claimed_packed_projection_count_its_dense_rows():
    model = neox()
    sp = nmflow.sparsify(model, nmflow.Recipe("ste", {"q": "1:4", "v": "1:2"}, dense_steps=0), 2, verbose=False)
    predicted = flops.final_densities(sp)
    sp.finalize()

    (name,) = predicted
    weight = model.get_submodule(name).weight
    assert predicted[name] == pytest.approx((weight != 0).float().mean().item())  # (1/4 + 1 + 1/2) / 3


def test_sparsified_experts_save_and_load_with_transformers_as_dense_master_weights(tmp_path):
    model = mixtral()
    keys = set(model.state_dict())
    sp = nmflow.sparsify(model, nmflow.Recipe("oneshot", {"experts": "1:4"}, dense_steps=1), 4, verbose=False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        lm_step(model, gen).backward()
        sp.step()

    model.save_pretrained(tmp_path)
    torch.manual_seed(123)  # a weight the checkpoint failed to provide would come out different
    loaded = type(model).from_pretrained(tmp_path).state_dict()

    assert set(loaded) == keys
    for name in EXPERT_WEIGHTS:
        module, _, param = name.rpartition(".")
        master = model.get_submodule(module).parametrizations[param].original
        assert torch.equal(loaded[name], master.detach())
