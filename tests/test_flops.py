"""FLOPs accounting against closed forms (2 FLOPs per multiply-add) and the paper's App. D numbers."""

import json

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTModel

import nmflow
from nmflow.flops import count_inference_flops, densities_at, final_densities, training_flops, training_flops_until

SEQ, D, FF, LAYERS = 196, 768, 3072, 12  # ViT-B/16 at 224 px, CLS token ignored as in the paper


def vit_b_encoder(attn: str = "sdpa") -> nn.Module:
    config = ViTConfig(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=12, intermediate_size=FF)
    config._attn_implementation = attn
    with torch.device("meta"):
        vit = ViTModel(config, add_pooling_layer=False)
    return nn.Sequential(*vit.layers)


def rows(count, kind="weight"):
    return {row.name: row.dense for row in count.layers if row.kind == kind}


def ff_names(layers=LAYERS):
    return [f"{i}.mlp.{fc}" for i in range(layers) for fc in ("fc1", "fc2")]


# ---------------------------------------------------------------- ViT-B, paper App. D
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_vit_b_matches_paper(attn):
    count = count_inference_flops(vit_b_encoder(attn), torch.empty(1, SEQ, D, device="meta"))
    proj, logits, ff = 2 * SEQ * D * D, 2 * SEQ * SEQ * D, 2 * SEQ * D * FF  # per layer: Q (=K=V=O), L (=A), FF1 (=FF2)
    assert count.dense_total == LAYERS * (4 * proj + 2 * logits + 2 * ff)
    weights, attention = rows(count), rows(count, "attention")
    assert len(weights) == 6 * LAYERS and len(attention) == LAYERS  # nothing else runs a matmul
    assert weights["3.attention.q_proj"] == weights["3.attention.o_proj"] == proj
    assert weights["3.mlp.fc1"] == weights["3.mlp.fc2"] == ff
    assert attention["3.attention"] == 2 * logits
    # the paper's numbers, in GFLOPs over 12 layers: Q = 2.77, L = 0.71, FF1 = 11.1, total 34.71
    assert LAYERS * weights["0.attention.q_proj"] == pytest.approx(2.77e9, rel=5e-3)
    assert LAYERS * attention["0.attention"] / 2 == pytest.approx(0.71e9, rel=5e-3)
    assert LAYERS * weights["0.mlp.fc1"] == pytest.approx(11.1e9, rel=5e-3)
    assert count.dense_total == pytest.approx(34.71e9, rel=5e-3)
    assert count.total == count.dense_total


@pytest.mark.parametrize(("n", "m", "paper"), [(1, 16, 13.90e9), (2, 4, 23.61e9), (1, 128, 12.69e9)])
def test_vit_b_sparse_ff_matches_paper(n, m, paper):
    densities = dict.fromkeys(ff_names(), n / m)  # attention.o_proj is not FF and stays dense
    count = count_inference_flops(vit_b_encoder(), torch.empty(1, SEQ, D, device="meta"), densities=densities)
    fixed = LAYERS * (4 * 2 * SEQ * D * D + 2 * 2 * SEQ * SEQ * D)
    assert count.total == pytest.approx(fixed + LAYERS * 2 * 2 * SEQ * D * FF * n / m, rel=1e-12)
    assert count.total == pytest.approx(paper, rel=5e-3)  # paper: 12.51 + 22.19 * S_FF
    assert count.by_kind()["attention"] == LAYERS * 2 * 2 * SEQ * SEQ * D
    json.dumps(count.as_dict())


# ---------------------------------------------------------------- other layouts, counted on CPU
def tiny_gpt2(attn: str) -> GPT2LMHeadModel:
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    config._attn_implementation = attn
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])  # the CPU SDPA kernel has no formula in FlopCounterMode
def test_gpt2_conv1d_and_attention(attn):
    batch, seq, e, vocab = 2, 10, 64, 100
    count = count_inference_flops(tiny_gpt2(attn), torch.randint(0, vocab, (batch, seq)))
    tokens = batch * seq
    expected = {"lm_head": 2 * tokens * e * vocab}
    for i in range(2):
        expected[f"transformer.h.{i}.attn.c_attn"] = 2 * tokens * e * 3 * e
        expected[f"transformer.h.{i}.attn.c_proj"] = 2 * tokens * e * e
        expected[f"transformer.h.{i}.mlp.c_fc"] = 2 * tokens * e * 4 * e
        expected[f"transformer.h.{i}.mlp.c_proj"] = 2 * tokens * 4 * e * e
    assert rows(count) == expected
    assert rows(count, "attention") == {f"transformer.h.{i}.attn": 2 * 2 * batch * seq * seq * e for i in range(2)}
    assert rows(count, "other") == {}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_vit_attention_counted_on_cpu(attn):
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    config._attn_implementation = attn
    encoder = nn.Sequential(*ViTModel(config).layers)
    count = count_inference_flops(encoder, torch.randn(3, 7, 32))
    assert rows(count, "attention") == {"0.attention": 2 * 2 * 3 * 7 * 7 * 32}


@pytest.mark.parametrize("training", [False, True])
def test_torch_encoder_layer_packed_in_proj(training):
    batch, seq, e, ff = 2, 5, 32, 64
    layer = nn.TransformerEncoderLayer(e, 4, ff, dropout=0.0, batch_first=True).train(training)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    count = count_inference_flops(layer, torch.randn(batch, seq, e))  # eval would take the uncounted fused path
    assert torch.backends.mha.get_fastpath_enabled() == fastpath
    tokens = batch * seq
    assert rows(count) == {
        "self_attn": 2 * tokens * e * 3 * e,  # packed in_proj_weight [3E, E]
        "self_attn.out_proj": 2 * tokens * e * e,
        "linear1": 2 * tokens * e * ff,
        "linear2": 2 * tokens * ff * e,
    }
    assert rows(count, "attention") == {"self_attn": 2 * 2 * batch * seq * seq * e}


def test_sparsified_model_counts_like_dense():
    model, ids = tiny_gpt2("eager"), torch.randint(0, 100, (1, 8))
    dense = count_inference_flops(model, ids)
    sp = nmflow.sparsify(
        model, nmflow.Recipe("ste", {"ff": "1:16", "qkv": "2:4"}, dense_fraction=0.0), 4, verbose=False
    )
    sp.step()
    assert sp.status().density["ff"] == 1 / 16  # masks are on
    assert count_inference_flops(model, ids) == dense  # the mask computation runs no matmul
    sparse = count_inference_flops(model, ids, densities=densities_at(sp, 1))
    ff = sum(v for k, v in rows(dense).items() if ".mlp." in k)
    qkv = sum(v for k, v in rows(dense).items() if "c_attn" in k)
    assert sparse.total == pytest.approx(dense.dense_total - ff * 15 / 16 - qkv / 2, rel=1e-12)


# ---------------------------------------------------------------- training FLOPs
STEPS, BATCH = 50, 3
STEPWISE_1_16 = [15 / 16, 8 / 16, 4 / 16, 2 / 16, 1 / 16]  # (M-1):M, M/2:M, ... down to 1:16 (paper 3.2)


def ff_state(recipe, t):
    """(forward density, weight-gradient density) of the FF layers at step t, derived from the plan alone."""
    plan = recipe.phase_plan(STEPS)
    d, f = plan.sparse_start, plan.finetune_start
    if recipe.method == "dense" or t < d:
        return 1.0, 1.0
    if t >= f:
        s = 1 / 16
    elif recipe.method == "mdgf-exp":
        s = 1.0  # exp(-beta j) > 0: pruned weights still multiply
    elif recipe.method == "mdgf-linear":
        s = 1.0 if 1 - recipe.resolved_beta(STEPS) * (t - d) > 0 else 1 / 16
    elif recipe.method == "sdgf-stepwise":
        s = STEPWISE_1_16[(t - d) * len(STEPWISE_1_16) // (f - d)]
    else:
        s = 1 / 16
    return s, (s if recipe.method == "oneshot" else 1.0)


@pytest.mark.parametrize("method", ["dense", "ste", "srste", "oneshot", "mdgf-exp", "mdgf-linear", "sdgf-stepwise"])
def test_training_flops_by_phase(method):
    recipe = nmflow.Recipe(method, {"ff": "1:16"}, dense_fraction=0.2, finetune_fraction=0.2)
    model = tiny_gpt2("eager")
    per_example = count_inference_flops(model, torch.randint(0, 100, (1, 8)))
    sp = nmflow.sparsify(model, recipe, STEPS, verbose=False)
    ff = sum(v for k, v in rows(per_example).items() if ".mlp." in k)
    rest = per_example.dense_total - ff
    per_step = []
    for t in range(STEPS):
        s, g = ff_state(recipe, t)
        per_step.append(BATCH * (3 * rest + ff * (2 * s + g)))
    if method == "dense":
        assert sum(per_step) == 3 * STEPS * BATCH * per_example.dense_total
    if method == "mdgf-linear":
        assert per_step.index(min(per_step)) < recipe.phase_plan(STEPS).finetune_start  # D reached 0 in the window
    assert training_flops(sp, per_example, BATCH) == pytest.approx(sum(per_step), rel=1e-12)
    for step in (0, 7, 10, 23, 35, 36, 40, 49):
        assert training_flops_until(sp, per_example, BATCH, step) == pytest.approx(sum(per_step[:step]), rel=1e-12)
    assert final_densities(sp) == dict.fromkeys(densities_at(sp, 0), 1.0 if method == "dense" else 1 / 16)


def test_training_flops_long_run_is_cheap():
    model = tiny_gpt2("eager")
    per_example = count_inference_flops(model, torch.randint(0, 100, (1, 8)))
    sp = nmflow.sparsify(model, nmflow.Recipe("sdgf-stepwise", {"ff": "1:16"}), 1_000_000, verbose=False)
    ff = sum(v for k, v in rows(per_example).items() if ".mlp." in k)
    fully_dense = 3 * 1_000_000 * per_example.dense_total
    assert fully_dense - 2 * 1_000_000 * ff < training_flops(sp, per_example, 1) < fully_dense


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("density", [0, 1.5, -0.1, True, "1:16"])
def test_bad_density_names_the_layer(density):
    with pytest.raises(nmflow.ConfigError, match=r"lm_head"):
        count_inference_flops(tiny_gpt2("eager"), torch.randint(0, 100, (1, 4)), densities={"lm_head": density})


@pytest.mark.parametrize("name", ["transformer.h.9.mlp.c_fc", "transformer.h.0.attn"])  # absent; attention only
def test_unknown_density_name(name):
    with pytest.raises(nmflow.ConfigError, match=name.replace(".", r"\.")):
        count_inference_flops(tiny_gpt2("eager"), torch.randint(0, 100, (1, 4)), densities={name: 0.5})


def test_training_flops_bad_input():
    model = tiny_gpt2("eager")
    sp = nmflow.sparsify(model, nmflow.Recipe("ste", {"ff": "1:16"}), 10, verbose=False)
    other = count_inference_flops(nn.Sequential(*model.transformer.h), torch.randn(1, 4, 64))  # other names
    with pytest.raises(nmflow.ConfigError, match=r"transformer\.h\.0\.mlp\.c_fc"):
        training_flops(sp, other, 1)
    per_example = count_inference_flops(model, torch.randint(0, 100, (1, 4)))
    with pytest.raises(nmflow.ConfigError, match="examples_per_step"):
        training_flops(sp, per_example, 0)
    with pytest.raises(nmflow.ConfigError, match="step"):
        training_flops_until(sp, per_example, 1, -1)


def test_module_run_outside_its_parent_is_refused():
    class Borrower(nn.Module):
        def forward(self, x, layer):
            return layer(x)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Sequential(nn.Linear(4, 4)), Borrower()

        def forward(self, x):
            return self.b(x, self.a[0])  # a.0's FLOPs are counted under b, not under a

    with pytest.raises(nmflow.NmflowError, match="outside its parent"):
        count_inference_flops(Model(), torch.randn(2, 4))
