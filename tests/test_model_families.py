"""Recipes attached to tiny random-init models of every family nmflow claims to recognise.

The layers each role should take are written out by hand per family (not derived from nmflow's
role table), so a wrong or missing rule shows up as a set difference.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import TimmStyleMlp, TimmStyleViT, nonzeros_per_group
from torch import nn
from torch.nn.utils import parametrize

import nmflow

VOCAB, DIM, HIDDEN, CLASSES = 50, 16, 32, 3
ROLES = ("ff", "q", "k", "v", "attn_out")
QKV = ("q", "k", "v")


# ------------------------------------------------------------------ models and their losses
def build_vit() -> nn.Module:
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=DIM,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=HIDDEN,
        num_labels=CLASSES,
    )
    return transformers.ViTForImageClassification(config)


def build_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=DIM,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=HIDDEN,
        max_position_embeddings=16,
        num_labels=CLASSES,
    )
    return transformers.BertForSequenceClassification(config)


def build_gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=DIM,
        n_layer=1,
        n_head=2,
        n_inner=HIDDEN,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def build_t5() -> nn.Module:
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=DIM,
        d_kv=8,
        d_ff=HIDDEN,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return transformers.T5ForConditionalGeneration(config)


def build_llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=DIM,
        intermediate_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        attention_bias=True,
        mlp_bias=True,
        bos_token_id=0,
        eos_token_id=1,
    )
    return transformers.LlamaForCausalLM(config)


class TorchEncoderClassifier(nn.Module):
    """``nn.TransformerEncoder`` between an embedding and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        layer = nn.TransformerEncoderLayer(DIM, nhead=2, dim_feedforward=HIDDEN, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(dim=1))


class MlpOnly(nn.Module):
    """A model with feed-forward layers and no attention at all."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = TimmStyleMlp(DIM, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def token_ids(gen: torch.Generator) -> torch.Tensor:
    return torch.randint(2, VOCAB, (2, 6), generator=gen)


def class_labels(gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, CLASSES, (2,), generator=gen)


def images(gen: torch.Generator) -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=gen)


def vit_loss(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
    return model(pixel_values=images(gen), labels=class_labels(gen)).loss


def bert_loss(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
    return model(input_ids=token_ids(gen), labels=class_labels(gen)).loss


def causal_lm_loss(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
    ids = token_ids(gen)
    return model(input_ids=ids, labels=ids).loss


def seq2seq_loss(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
    return model(input_ids=token_ids(gen), labels=token_ids(gen)).loss


def torch_encoder_loss(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
    return F.cross_entropy(model(token_ids(gen)), class_labels(gen))


def timm_loss(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
    return F.cross_entropy(model(images(gen)), class_labels(gen))


# ------------------------------------------------------------------ the case table
@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], nn.Module]
    loss: Callable[[nn.Module, torch.Generator], torch.Tensor]
    expected: dict[str, tuple[str, ...]]  # role -> module names that role must take, written by hand
    never: tuple[str, ...]  # embeddings, heads, norms, pooler: no role may take them
    norm: str  # one normalisation layer, for the regex-on-a-norm check
    in_dim: int = 1  # the input dimension of every taken tensor (Conv1D: 0)
    packed: dict[str, tuple[str, int]] = field(default_factory=dict)  # Q/K/V in one tensor: (param, out dim)
    hf: bool = True

    def __repr__(self) -> str:
        return self.name


def per_layer(layers: int, *templates: str) -> tuple[str, ...]:
    return tuple(template.format(i) for i in range(layers) for template in templates)


VIT = Family(
    "vit",
    build_vit,
    vit_loss,
    expected={
        "ff": ("vit.layers.0.mlp.fc1", "vit.layers.0.mlp.fc2"),
        "q": ("vit.layers.0.attention.q_proj",),
        "k": ("vit.layers.0.attention.k_proj",),
        "v": ("vit.layers.0.attention.v_proj",),
        "attn_out": ("vit.layers.0.attention.o_proj",),
    },
    never=(
        "vit.embeddings.patch_embeddings.projection",
        "vit.layers.0.layernorm_before",
        "vit.layers.0.layernorm_after",
        "vit.layernorm",
        "classifier",
    ),
    norm="vit.layers.0.layernorm_before",
)
BERT_LAYER = "bert.encoder.layer.0"
BERT = Family(
    "bert",
    build_bert,
    bert_loss,
    expected={
        "ff": (f"{BERT_LAYER}.intermediate.dense", f"{BERT_LAYER}.output.dense"),
        "q": (f"{BERT_LAYER}.attention.self.query",),
        "k": (f"{BERT_LAYER}.attention.self.key",),
        "v": (f"{BERT_LAYER}.attention.self.value",),
        "attn_out": (f"{BERT_LAYER}.attention.output.dense",),
    },
    never=(
        "bert.embeddings.word_embeddings",
        "bert.embeddings.position_embeddings",
        "bert.embeddings.token_type_embeddings",
        "bert.embeddings.LayerNorm",
        f"{BERT_LAYER}.attention.output.LayerNorm",
        f"{BERT_LAYER}.output.LayerNorm",
        "bert.pooler.dense",
        "classifier",
    ),
    norm=f"{BERT_LAYER}.output.LayerNorm",
)
GPT2 = Family(
    "gpt2",
    build_gpt2,
    causal_lm_loss,
    expected={
        "ff": ("transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"),
        "q": ("transformer.h.0.attn.c_attn",),
        "k": ("transformer.h.0.attn.c_attn",),
        "v": ("transformer.h.0.attn.c_attn",),
        "attn_out": ("transformer.h.0.attn.c_proj",),
    },
    never=("transformer.wte", "transformer.wpe", "transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.ln_f"),
    norm="transformer.h.0.ln_2",
    in_dim=0,
    packed={"transformer.h.0.attn.c_attn": ("weight", 1)},  # Conv1D [in, 3 * out]: column blocks
)
T5_ATTENTION = (
    "encoder.block.0.layer.0.SelfAttention",
    "decoder.block.0.layer.0.SelfAttention",
    "decoder.block.0.layer.1.EncDecAttention",
)
T5 = Family(
    "t5",
    build_t5,
    seq2seq_loss,
    expected={
        "ff": (
            "encoder.block.0.layer.1.DenseReluDense.wi_0",
            "encoder.block.0.layer.1.DenseReluDense.wi_1",
            "encoder.block.0.layer.1.DenseReluDense.wo",
            "decoder.block.0.layer.2.DenseReluDense.wi_0",
            "decoder.block.0.layer.2.DenseReluDense.wi_1",
            "decoder.block.0.layer.2.DenseReluDense.wo",
        ),
        "q": tuple(f"{a}.q" for a in T5_ATTENTION),
        "k": tuple(f"{a}.k" for a in T5_ATTENTION),
        "v": tuple(f"{a}.v" for a in T5_ATTENTION),
        "attn_out": tuple(f"{a}.o" for a in T5_ATTENTION),
    },
    never=(
        "shared",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias",
        "encoder.block.0.layer.0.layer_norm",
        "decoder.block.0.layer.2.layer_norm",
        "encoder.final_layer_norm",
        "decoder.final_layer_norm",
        "lm_head",
    ),
    norm="encoder.block.0.layer.1.layer_norm",
)
LLAMA = Family(
    "llama",
    build_llama,
    causal_lm_loss,
    expected={
        "ff": per_layer(
            2, "model.layers.{}.mlp.gate_proj", "model.layers.{}.mlp.up_proj", "model.layers.{}.mlp.down_proj"
        ),
        "q": per_layer(2, "model.layers.{}.self_attn.q_proj"),
        "k": per_layer(2, "model.layers.{}.self_attn.k_proj"),
        "v": per_layer(2, "model.layers.{}.self_attn.v_proj"),
        "attn_out": per_layer(2, "model.layers.{}.self_attn.o_proj"),
    },
    never=(
        "model.embed_tokens",
        *per_layer(2, "model.layers.{}.input_layernorm", "model.layers.{}.post_attention_layernorm"),
        "model.norm",
        "lm_head",
    ),
    norm="model.layers.1.post_attention_layernorm",
)
TORCH_ENCODER = Family(
    "torch-encoder",
    TorchEncoderClassifier,
    torch_encoder_loss,
    expected={
        "ff": per_layer(2, "encoder.layers.{}.linear1", "encoder.layers.{}.linear2"),
        **dict.fromkeys(QKV, per_layer(2, "encoder.layers.{}.self_attn")),
        "attn_out": per_layer(2, "encoder.layers.{}.self_attn.out_proj"),
    },
    never=("embed", *per_layer(2, "encoder.layers.{}.norm1", "encoder.layers.{}.norm2"), "head"),
    norm="encoder.layers.0.norm1",
    packed=dict.fromkeys(per_layer(2, "encoder.layers.{}.self_attn"), ("in_proj_weight", 0)),  # row blocks
    hf=False,
)
TIMM = Family(
    "timm-style",
    TimmStyleViT,
    timm_loss,
    expected={
        "ff": per_layer(2, "blocks.{}.mlp.fc1", "blocks.{}.mlp.fc2"),
        **dict.fromkeys(QKV, per_layer(2, "blocks.{}.attn.qkv")),
        "attn_out": per_layer(2, "blocks.{}.attn.proj"),
    },
    never=("patch_embed.proj", *per_layer(2, "blocks.{}.norm1", "blocks.{}.norm2"), "norm", "head"),
    norm="blocks.1.norm2",
    packed=dict.fromkeys(per_layer(2, "blocks.{}.attn.qkv"), ("weight", 0)),  # Linear [3 * out, in]: row blocks
    hf=False,
)
FAMILIES = (VIT, BERT, GPT2, T5, LLAMA, TORCH_ENCODER, TIMM)
HF_FAMILIES = tuple(f for f in FAMILIES if f.hf)
PACKED_FAMILIES = tuple(f for f in FAMILIES if f.packed)
WITH_BIASES = tuple(f for f in FAMILIES if f is not T5)  # T5 has no biases


# ------------------------------------------------------------------ helpers
def built(family: Family) -> nn.Module:
    torch.manual_seed(0)
    return family.build()


def param_name(family: Family, module_name: str) -> str:
    return family.packed.get(module_name, ("weight", 0))[0]


def block_bounds(family: Family, module_name: str, role: str, tensor: torch.Tensor) -> tuple[int, int, int]:
    """(out dim, start, stop) of ``role``'s rows/columns in ``tensor``: a third of a packed one, else all of it."""
    if module_name in family.packed:
        out_dim = family.packed[module_name][1]
        size = tensor.shape[out_dim] // 3
        index = QKV.index(role)
        return out_dim, index * size, (index + 1) * size
    out_dim = 1 - family.in_dim
    return out_dim, 0, tensor.shape[out_dim]


def role_block(family: Family, model: nn.Module, module_name: str, role: str) -> torch.Tensor:
    tensor = getattr(model.get_submodule(module_name), param_name(family, module_name))
    out_dim, start, stop = block_bounds(family, module_name, role, tensor)
    return tensor.detach().narrow(out_dim, start, stop - start)


def taken(sp: nmflow.Sparsifier) -> set[tuple[str, str]]:
    return {(t.name, seg.role) for t in sp.targets for seg in t.segments}


def parametrized_modules(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if parametrize.is_parametrized(module)}


def train(model: nn.Module, sp: nmflow.Sparsifier, family: Family, steps: int, after_backward=None) -> list:
    """Plain AdamW steps with ``sp.step()`` after each; returns the phase each forward ran under."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    phases = []
    model.train()
    for _ in range(steps):
        phases.append(sp.status().phase)
        family.loss(model, gen).backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        optimizer.zero_grad()
        sp.step()
    return phases


def snapshot(model: nn.Module) -> dict:
    """Everything sparsify could change: values, parameter objects, module classes, hooks."""
    return {
        "values": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": {name: id(p) for name, p in model.named_parameters()},
        "types": {name: type(m) for name, m in model.named_modules()},
        "hooks": {
            name: (len(m._state_dict_hooks), len(m._load_state_dict_pre_hooks)) for name, m in model.named_modules()
        },
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["values"].keys() == before["values"].keys()
    for key, value in before["values"].items():
        torch.testing.assert_close(after["values"][key], value, rtol=0, atol=0, equal_nan=True)
    assert after["params"] == before["params"]
    assert after["types"] == before["types"]
    assert after["hooks"] == before["hooks"]
    assert not parametrized_modules(model)


def indivisible_ff(family: Family, model: nn.Module, m: int) -> tuple[list[str], list[str]]:
    """The ff layers whose input size ``m`` does / does not divide, read off the weight shapes."""
    bad, good = [], []
    for name in family.expected["ff"]:
        size = model.get_submodule(name).weight.shape[family.in_dim]
        (bad if size % m else good).append(name)
    return bad, good


# ------------------------------------------------------------------ which layers each role takes
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_each_role_takes_exactly_the_expected_layers(family, role):
    model = built(family)
    sp = nmflow.sparsify(model, nmflow.Recipe("ste", {role: "1:4"}), total_steps=10, verbose=False)

    assert taken(sp) == {(name, role) for name in family.expected[role]}
    assert parametrized_modules(model) == set(family.expected[role])
    for target in sp.targets:
        assert target.param_name == param_name(family, target.name)
        assert target.in_dim == family.in_dim
        (segment,) = target.segments
        tensor = getattr(target.module, target.param_name)
        out_dim, start, stop = block_bounds(family, target.name, role, tensor)
        assert (target.out_dim, segment.start, segment.stop) == (out_dim, start, stop)


@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_embeddings_heads_norms_and_poolers_are_never_taken(family):
    model = built(family)
    for name in family.never:
        model.get_submodule(name)  # the name is real, so its absence below means something
    sp = nmflow.sparsify(model, nmflow.Recipe("ste", {"ff": "1:4", "qkv": "1:4", "attn_out": "1:4"}), 10, verbose=False)

    taken_names = {t.name for t in sp.targets}
    assert taken_names == {name for role in ROLES for name in family.expected[role]}
    assert not taken_names & set(family.never)


def test_roles_a_model_lacks_are_named_in_the_error():
    for role in ("q", "k", "v", "qk", "qkv", "attn_out"):
        model = MlpOnly()
        before = snapshot(model)
        with pytest.raises(nmflow.NoMatchingTargetError, match=re.escape(repr(role))):
            nmflow.sparsify(model, nmflow.Recipe("ste", {role: "1:4"}), 10, verbose=False)
        assert_unchanged(model, before)
    sp = nmflow.sparsify(MlpOnly(), nmflow.Recipe("ste", {"ff": "1:4"}), 10, verbose=False)
    assert taken(sp) == {("mlp.fc1", "ff"), ("mlp.fc2", "ff")}


# ------------------------------------------------------------------ state dicts
@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_state_dict_keys_are_kept_and_a_plain_checkpoint_loads_strictly(family):
    model = built(family)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = nmflow.Recipe("mdgf-exp", {"ff": "1:4", "qkv": "2:4", "attn_out": "1:2"}, dense_steps=0)
    nmflow.sparsify(model, recipe, total_steps=10, verbose=False)
    assert set(model.state_dict()) == set(plain)

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # move every weight away from the checkpoint, so loading it has to restore them
    result = model.load_state_dict(plain, strict=True)

    assert not result.missing_keys and not result.unexpected_keys
    restored = model.state_dict()
    assert set(restored) == set(plain)
    for key, value in plain.items():
        assert torch.equal(restored[key], value), key


# ------------------------------------------------------------------ training and finalize
FULL_RECIPE = {"ff": "1:4", "qk": "2:4", "v": "1:2"}  # attn_out left dense on purpose
EXPECTED_PATTERNS = {"ff": (1, 4), "q": (2, 4), "k": (2, 4), "v": (1, 2), "attn_out": None}


def assert_role_blocks(family: Family, model: nn.Module, patterns: dict[str, tuple[int, int] | None]) -> None:
    """Each role's block holds exactly N non-zeros per M along the input dim, or no zero at all when dense."""
    for role, pattern in patterns.items():
        for name in family.expected[role]:
            block = role_block(family, model, name, role)
            if pattern is None:
                assert (block != 0).all(), f"{name}[{role}] should be dense"
            else:
                n, m = pattern
                counts = nonzeros_per_group(block, m, family.in_dim)
                assert (counts == n).all(), f"{name}[{role}]: non-zeros per group {counts.unique().tolist()}, want {n}"
                assert nmflow.is_nm(block, n, m, dim=family.in_dim)


@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_training_through_every_phase_then_finalize_gives_exact_nm_plain_modules(family):
    model = built(family)
    keys = set(model.state_dict())
    recipe = nmflow.Recipe("mdgf-exp", FULL_RECIPE, dense_steps=1, finetune_steps=2)
    sp = nmflow.sparsify(model, recipe, total_steps=6, verbose=False)

    phases = train(model, sp, family, steps=6)
    assert phases == [nmflow.Phase.DENSE] + [nmflow.Phase.SPARSE] * 3 + [nmflow.Phase.FINETUNE] * 2

    model.eval()
    with torch.no_grad():
        loss_sparsified = family.loss(model, torch.Generator().manual_seed(2))
    sp.finalize()
    with torch.no_grad():
        loss_final = family.loss(model, torch.Generator().manual_seed(2))

    assert not parametrized_modules(model)
    assert set(model.state_dict()) == keys
    assert_role_blocks(family, model, EXPECTED_PATTERNS)
    torch.testing.assert_close(loss_final, loss_sparsified)  # finalize bakes in what the finetune forward used


PACKED_RECIPES = (
    ({"qk": "1:4"}, {"q": (1, 4), "k": (1, 4), "v": None}),
    ({"q": "1:4", "v": "1:2"}, {"q": (1, 4), "k": None, "v": (1, 2)}),
)


@pytest.mark.parametrize(("sparsity", "patterns"), PACKED_RECIPES, ids=("qk", "q+v"))
@pytest.mark.parametrize("family", PACKED_FAMILIES, ids=repr)
def test_packed_qkv_sparsifies_only_the_claimed_blocks(family, sparsity, patterns):
    model = built(family)
    sp = nmflow.sparsify(model, nmflow.Recipe("ste", sparsity, dense_steps=0), total_steps=4, verbose=False)
    train(model, sp, family, steps=2)
    sp.finalize()

    assert not parametrized_modules(model)
    assert_role_blocks(family, model, patterns)


@pytest.mark.parametrize("family", WITH_BIASES, ids=repr)
def test_sparsified_layers_keep_and_train_their_biases(family):
    model = built(family)
    recipe = nmflow.Recipe("mdgf-exp", {"ff": "1:4", "qkv": "1:4", "attn_out": "1:4"}, dense_steps=1, finetune_steps=1)
    sp = nmflow.sparsify(model, recipe, total_steps=4, verbose=False)
    biases = {t.name: getattr(t.module, t.param_name.replace("weight", "bias")) for t in sp.targets}
    assert all(isinstance(b, nn.Parameter) for b in biases.values())
    initial = {name: b.detach().clone() for name, b in biases.items()}

    def every_bias_has_a_gradient():
        for name, bias in biases.items():
            assert bias.grad is not None and bias.grad.abs().sum() > 0, f"{name}: no gradient reached the bias"

    train(model, sp, family, steps=4, after_backward=every_bias_has_a_gradient)
    trained = {name: b.detach().clone() for name, b in biases.items()}
    sp.finalize()

    for name, bias in biases.items():
        assert not torch.equal(trained[name], initial[name]), f"{name}: bias did not train"
        assert torch.equal(bias.detach(), trained[name]), f"{name}: finalize changed the bias"


@pytest.mark.parametrize("family", HF_FAMILIES, ids=repr)
def test_save_pretrained_then_from_pretrained_restores_the_dense_weights(family, tmp_path):
    model = built(family)
    keys = set(model.state_dict())
    recipe = nmflow.Recipe("mdgf-exp", {"ff": "1:4", "qkv": "2:4"}, dense_steps=1, finetune_steps=1)
    sp = nmflow.sparsify(model, recipe, total_steps=6, verbose=False)
    train(model, sp, family, steps=2)

    model.save_pretrained(tmp_path)
    torch.manual_seed(123)  # any weight the checkpoint failed to provide would come out different
    fresh = type(model).from_pretrained(tmp_path)

    saved, loaded = model.state_dict(), fresh.state_dict()
    assert set(loaded) == keys == set(saved)
    for key in keys:
        assert torch.equal(loaded[key], saved[key]), key
    for t in sp.targets:  # what was saved is the dense master weight, not its masked view
        original = t.module.parametrizations[t.param_name].original
        assert torch.equal(loaded[f"{t.name}.{t.param_name}"], original.detach())


# ------------------------------------------------------------------ errors leave the model as it was
def bad_recipe(kind: str, family: Family, model: nn.Module) -> tuple[nmflow.Recipe, type, list[str], list[str]]:
    """(recipe, error class, text the message must name, text it must not name)."""
    if kind == "indivisible":
        bad, good = indivisible_ff(family, model, 32)
        return nmflow.Recipe("ste", {"ff": "1:32"}), nmflow.ConfigError, bad, good
    if kind == "regex matching nothing":
        key = "re:no_such_layer_.*"
        return nmflow.Recipe("ste", {"ff": "1:4", key: "1:4"}), nmflow.NoMatchingTargetError, [key], []
    if kind == "regex on a norm":
        key = f"re:{re.escape(family.norm)}"
        return nmflow.Recipe("ste", {"ff": "1:4", key: "1:4"}), nmflow.ConfigError, [family.norm], []
    if kind == "two keys claim one layer":
        first_ff = family.expected["ff"][0]
        recipe = nmflow.Recipe("ste", {"ff": "1:4", f"re:{re.escape(first_ff)}": "2:4"})
        return recipe, nmflow.ConfigError, [first_ff], []
    if kind == "unwalkable target":
        return nmflow.Recipe("sdgf-stepwise", {"ff": "3:4"}), nmflow.ConfigError, ["3:4"], []
    assert kind == "decay ends inside the dense phase"
    recipe = nmflow.Recipe("mdgf-exp", {"ff": "1:4"}, dense_fraction=0.8, decay_end_fraction=0.5)
    return recipe, nmflow.ConfigError, ["dense phase"], []


BAD_KINDS = (
    "indivisible",
    "regex matching nothing",
    "regex on a norm",
    "two keys claim one layer",
    "unwalkable target",
    "decay ends inside the dense phase",
)


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_config_errors_name_the_problem_and_leave_the_model_unchanged(family, kind):
    model = built(family)
    recipe, error, named, not_named = bad_recipe(kind, family, model)
    assert named  # a message check with nothing to find could not fail
    before = snapshot(model)

    with pytest.raises(error) as raised:
        nmflow.sparsify(model, recipe, total_steps=10, verbose=False)

    message = str(raised.value)
    for text in named:
        assert text in message
    for text in not_named:
        assert text not in message
    assert_unchanged(model, before)


@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_skip_indivisible_leaves_those_layers_dense_with_a_warning(family):
    model = built(family)
    skipped, kept = indivisible_ff(family, model, 32)
    assert skipped and kept

    with pytest.warns(UserWarning) as warned:
        sp = nmflow.sparsify(model, nmflow.Recipe("ste", {"ff": "1:32"}, skip_indivisible=True), 10, verbose=False)

    message = "\n".join(str(w.message) for w in warned)
    assert all(name in message for name in skipped)
    assert taken(sp) == {(name, "ff") for name in kept}
    assert parametrized_modules(model) == set(kept)


def test_non_finite_weights_at_attach_time_leave_the_model_unchanged():
    model = built(TIMM)
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight[0, 0] = float("nan")
    before = snapshot(model)

    with pytest.raises(nmflow.NonFiniteWeightError, match=re.escape("blocks.1.mlp.fc2")):
        nmflow.sparsify(model, nmflow.Recipe("ste", {"ff": "1:4"}, dense_steps=0), 10, verbose=False)
    assert_unchanged(model, before)


def test_sparsifying_twice_is_refused_and_keeps_the_first_attachment():
    model = built(TIMM)
    first = nmflow.sparsify(model, nmflow.Recipe("ste", {"ff": "1:4"}), 10, verbose=False)
    before = snapshot(model)

    with pytest.raises(nmflow.ConfigError, match="already parametrized"):
        nmflow.sparsify(model, nmflow.Recipe("ste", {"qkv": "1:4", "ff": "1:4"}), 10, verbose=False)

    after = snapshot(model)
    assert after["types"] == before["types"] and after["hooks"] == before["hooks"]
    assert parametrized_modules(model) == {t.name for t in first.targets}


# ------------------------------------------------------------------ regex roles
@pytest.mark.parametrize("family", (VIT, TIMM), ids=repr)
def test_a_regex_role_takes_only_the_layers_it_names(family):
    model = built(family)
    sp = nmflow.sparsify(model, nmflow.Recipe("ste", {r"re:.*mlp\.fc1": "1:4"}), 10, verbose=False)

    fc1_layers = {name for name in family.expected["ff"] if name.endswith("mlp.fc1")}
    assert fc1_layers
    assert {t.name for t in sp.targets} == fc1_layers
    assert parametrized_modules(model) == fc1_layers


def test_a_tied_weight_is_refused():
    model = built(GPT2)
    assert model.lm_head.weight is model.transformer.wte.weight  # GPT-2 ties its head to the token embedding
    before = snapshot(model)

    with pytest.raises(nmflow.ConfigError) as raised:
        nmflow.sparsify(model, nmflow.Recipe("ste", {"re:lm_head": "1:4"}), 10, verbose=False)

    assert "lm_head" in str(raised.value) and "transformer.wte" in str(raised.value)
    assert_unchanged(model, before)
