"""Roles found without configuration on tiny random-init models of the mainstream transformer families.

For each family the layers every role must take, and the rows of packed Q/K/V projections, are written out by
hand from that model's transformers source (the line that splits the packed tensor is quoted), never derived
from nmflow's role table. Then a short run: train, finalize, read exact N:M back from the weights at those
rows, keep the state-dict keys, round-trip the compressed format. (ViT, BERT, GPT-2, T5, LLaMA, torch's
encoder and timm blocks are covered in test_model_families.py.)
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from helpers import nonzeros_per_group
from test_model_families import FAMILIES as FIRST_FAMILIES
from torch import nn

import nmflow

README = Path(__file__).resolve().parent.parent / "README.md"

VOCAB, DIM, HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 32, 64, 4, 2, 8
BASE = dict(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS)
LM = dict(
    BASE, num_key_value_heads=KV_HEADS, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=0
)
ENC_DEC = dict(
    vocab_size=VOCAB,
    d_model=DIM,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=HEADS,
    decoder_attention_heads=HEADS,
    encoder_ffn_dim=HIDDEN,
    decoder_ffn_dim=HIDDEN,
    max_position_embeddings=32,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=1,
)
VISION = dict(hidden_size=DIM, num_hidden_layers=1, num_attention_heads=HEADS, image_size=8, patch_size=4)
TOWER = dict(hidden_size=DIM, intermediate_size=HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS)
Rows = tuple[tuple[int, int], ...]  # [start, stop) ranges of output rows


# ------------------------------------------------------------------ inputs and losses
def ids(gen: torch.Generator, length: int = 6) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, length), generator=gen)


def labels(gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (2,), generator=gen)


def images(gen: torch.Generator, size: int = 8) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=gen)


def causal_lm(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
    tokens = ids(gen)
    return model(input_ids=tokens, labels=tokens).loss


def classify_text(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
    return model(input_ids=ids(gen), labels=labels(gen)).loss


def seq2seq(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
    return model(input_ids=ids(gen), labels=ids(gen)).loss


def classify_image(model: nn.Module, gen: torch.Generator, size: int = 8) -> torch.Tensor:
    return model(pixel_values=images(gen, size), labels=labels(gen)).loss


def contrastive(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
    return model(input_ids=ids(gen), pixel_values=images(gen), return_loss=True).loss


def speech_to_text(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
    features = torch.randn(2, 8, 32, generator=gen)  # num_mel_bins x 2 * max_source_positions
    return model(input_features=features, labels=ids(gen, 5)).loss


def classify_audio(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
    return model(input_values=torch.randn(2, 200, generator=gen), labels=labels(gen)).loss


class TorchTransformer(nn.Module):
    """``nn.Transformer`` (encoder and decoder, cross-attention included) between embeddings and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.transformer = nn.Transformer(DIM, HEADS, 1, 1, HIDDEN, dropout=0.0, batch_first=True)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.head(self.transformer(self.embed(src), self.embed(tgt)))


def torch_transformer_loss(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
    target = ids(gen)
    return F.cross_entropy(model(ids(gen), target).flatten(0, 1), target.flatten())


# ------------------------------------------------------------------ the case table
@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], nn.Module]
    loss: Callable[[nn.Module, torch.Generator], torch.Tensor]
    expected: dict[str, tuple[str, ...]]  # role -> tensors it must take (module name, or module.param for experts)
    packed: dict[str, dict[str, Rows]] = field(default_factory=dict)  # tensor -> role -> its rows, by hand

    def __repr__(self) -> str:
        return self.name


def hf(config: type, model: type, **kwargs) -> Callable[[], nn.Module]:
    return lambda: model(config(**kwargs))


def attention(prefix: str, q: str, k: str, v: str, out: str) -> dict[str, tuple[str, ...]]:
    return {"q": (f"{prefix}.{q}",), "k": (f"{prefix}.{k}",), "v": (f"{prefix}.{v}",), "attn_out": (f"{prefix}.{out}",)}


def packed(name: str, out: str, rows: dict[str, Rows]) -> tuple[dict, dict]:
    """Expected roles of one packed Q/K/V projection ``name`` with attention output ``out``."""
    return {"q": (name,), "k": (name,), "v": (name,), "attn_out": (out,)}, {name: rows}


def per_head(groups: int, *sizes: tuple[str, int]) -> dict[str, Rows]:
    """Rows of roles interleaved in ``groups`` periods, each period ``sizes`` (role, rows) in order."""
    period = sum(size for _, size in sizes)
    rows: dict[str, list[tuple[int, int]]] = {}
    offset = 0
    for role, size in sizes:
        rows[role] = [(g * period + offset, g * period + offset + size) for g in range(groups)]
        offset += size
    return {role: tuple(r) for role, r in rows.items()}


def llama_like(name: str, config: type, model: type, prefix: str = "model.layers.0", **extra) -> Family:
    layer = prefix
    return Family(
        name,
        hf(config, model, **{**LM, **extra}),
        causal_lm,
        {
            "ff": (f"{layer}.mlp.gate_proj", f"{layer}.mlp.up_proj", f"{layer}.mlp.down_proj"),
            **attention(f"{layer}.self_attn", "q_proj", "k_proj", "v_proj", "o_proj"),
        },
    )


def bert_like(name: str, config: type, model: type, base: str, q="query", k="key", v="value", **extra) -> Family:
    layer = f"{base}.encoder.layer.0"
    return Family(
        name,
        hf(config, model, **{**BASE, "max_position_embeddings": 32, "pad_token_id": 1, **extra}),
        classify_text,
        {
            "ff": (f"{layer}.intermediate.dense", f"{layer}.output.dense"),
            **attention(f"{layer}.attention", f"self.{q}", f"self.{k}", f"self.{v}", "output.dense"),
        },
    )


def enc_dec(name: str, config: type, model: type, loss=seq2seq, **extra) -> Family:
    enc, dec = "model.encoder.layers.0", "model.decoder.layers.0"
    attn = [f"{enc}.self_attn", f"{dec}.self_attn", f"{dec}.encoder_attn"]
    return Family(
        name,
        hf(config, model, **{**ENC_DEC, **extra}),
        loss,
        {
            "ff": (f"{enc}.fc1", f"{enc}.fc2", f"{dec}.fc1", f"{dec}.fc2"),
            "q": tuple(f"{a}.q_proj" for a in attn),
            "k": tuple(f"{a}.k_proj" for a in attn),
            "v": tuple(f"{a}.v_proj" for a in attn),
            "attn_out": tuple(f"{a}.out_proj" for a in attn),
        },
    )


def vit_like(name: str, config: type, model: type, layer: str, loss=classify_image, **extra) -> Family:
    return Family(
        name,
        hf(config, model, **{**VISION, "intermediate_size": HIDDEN, **extra}),
        loss,
        {
            "ff": (f"{layer}.mlp.fc1", f"{layer}.mlp.fc2"),
            **attention(f"{layer}.attention", "q_proj", "k_proj", "v_proj", "o_proj"),
        },
    )


def two_towers(name: str, config: type, model: type) -> Family:
    towers = ("text_model.encoder.layers.0", "vision_model.encoder.layers.0")
    text = dict(TOWER, vocab_size=VOCAB, max_position_embeddings=16)
    vision = dict(TOWER, image_size=8, patch_size=4)
    return Family(
        name,
        hf(config, model, text_config=text, vision_config=vision),
        contrastive,
        {
            "ff": tuple(f"{t}.mlp.{fc}" for t in towers for fc in ("fc1", "fc2")),
            "q": tuple(f"{t}.self_attn.q_proj" for t in towers),
            "k": tuple(f"{t}.self_attn.k_proj" for t in towers),
            "v": tuple(f"{t}.self_attn.v_proj" for t in towers),
            "attn_out": tuple(f"{t}.self_attn.out_proj" for t in towers),
        },
    )


GPTJ_ATTN = "transformer.h.0.attn"
NEOX = "gpt_neox.layers.0.attention"
BLOOM = "transformer.h.0.self_attention"
FALCON = "transformer.h.0.self_attention"
BIGCODE = "transformer.h.0.attn"
PER_HEAD_QKV = per_head(HEADS, ("q", HEAD_DIM), ("k", HEAD_DIM), ("v", HEAD_DIM))  # [heads, 3, head_dim]
MULTI_QUERY = per_head(1, ("q", DIM), ("k", HEAD_DIM), ("v", HEAD_DIM))  # [Q | one K head | one V head]
THIRDS = per_head(1, ("q", DIM), ("k", DIM), ("v", DIM))  # [Q | K | V]
FALCON_FF = {"ff": ("transformer.h.0.mlp.dense_h_to_4h", "transformer.h.0.mlp.dense_4h_to_h")}
BIGCODE_FF = {"ff": ("transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj")}
GPT = dict(vocab_size=VOCAB, n_embd=DIM, n_layer=1, n_head=HEADS, n_positions=32, bos_token_id=0, eos_token_id=0)
MOE_LAYER = "model.layers.0.mlp"
ROUTED = (f"{MOE_LAYER}.experts.gate_up_proj", f"{MOE_LAYER}.experts.down_proj")  # 3-D [experts, out, in]
SHARED = tuple(f"{MOE_LAYER}.shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj"))
ALBERT = "albert.encoder.albert_layer_groups.0.albert_layers.0"
DISTIL = "distilbert.transformer.layer.0"
W2V = "wav2vec2.encoder.layers.0"
SWIN = ("swin.encoder.layers.0.blocks.0", "swin.encoder.layers.1.blocks.0")
TORCH = ("transformer.encoder.layers.0", "transformer.decoder.layers.0")
TORCH_ATTN = (f"{TORCH[0]}.self_attn", f"{TORCH[1]}.self_attn", f"{TORCH[1]}.multihead_attn")


def family_with_packed(name, build, loss, ff, qkv, out, rows) -> Family:
    roles, layouts = packed(qkv, out, rows)
    return Family(name, build, loss, {"ff": ff, **roles}, layouts)


FAMILIES = (
    llama_like("mistral", T.MistralConfig, T.MistralForCausalLM),
    llama_like("qwen2", T.Qwen2Config, T.Qwen2ForCausalLM),
    llama_like("qwen3", T.Qwen3Config, T.Qwen3ForCausalLM, head_dim=HEAD_DIM),
    llama_like("gemma", T.GemmaConfig, T.GemmaForCausalLM, head_dim=HEAD_DIM),
    llama_like("gemma2", T.Gemma2Config, T.Gemma2ForCausalLM, head_dim=HEAD_DIM),
    llama_like("gemma3", T.Gemma3TextConfig, T.Gemma3ForCausalLM, head_dim=HEAD_DIM),
    llama_like("olmo", T.OlmoConfig, T.OlmoForCausalLM),
    llama_like("olmo2", T.Olmo2Config, T.Olmo2ForCausalLM),
    llama_like("stablelm", T.StableLmConfig, T.StableLmForCausalLM),
    llama_like("granite", T.GraniteConfig, T.GraniteForCausalLM),
    Family(
        "mixtral",  # MixtralExperts: gate_up_proj [experts, 2 * ffn, hidden], down_proj [experts, hidden, ffn]
        hf(T.MixtralConfig, T.MixtralForCausalLM, **LM, num_local_experts=4, num_experts_per_tok=2),
        causal_lm,
        {
            "ff": ROUTED,
            "experts": ROUTED,
            **attention("model.layers.0.self_attn", "q_proj", "k_proj", "v_proj", "o_proj"),
        },
    ),
    Family(
        "qwen2-moe",  # routed experts, a shared expert and its gate (dense: it is a router)
        hf(
            T.Qwen2MoeConfig,
            T.Qwen2MoeForCausalLM,
            **LM,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=HIDDEN,
        ),
        causal_lm,
        {
            "ff": ROUTED + SHARED,
            "experts": ROUTED,
            **attention("model.layers.0.self_attn", "q_proj", "k_proj", "v_proj", "o_proj"),
        },
    ),
    Family(
        "phi",
        hf(T.PhiConfig, T.PhiForCausalLM, **LM),
        causal_lm,
        {
            "ff": ("model.layers.0.mlp.fc1", "model.layers.0.mlp.fc2"),
            **attention("model.layers.0.self_attn", "q_proj", "k_proj", "v_proj", "dense"),
        },
    ),
    family_with_packed(  # Phi3Attention: qkv[..., :query_pos], then num_key_value_heads * head_dim for K, the rest V
        "phi3",
        hf(T.Phi3Config, T.Phi3ForCausalLM, **LM),
        causal_lm,
        ("model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj"),
        "model.layers.0.self_attn.qkv_proj",
        "model.layers.0.self_attn.o_proj",
        per_head(1, ("q", HEADS * HEAD_DIM), ("k", KV_HEADS * HEAD_DIM), ("v", KV_HEADS * HEAD_DIM)),
    ),
    family_with_packed(  # GPTNeoXAttention: view(..., -1, 3 * head_size).chunk(3, dim=-1)
        "gpt-neox",
        hf(T.GPTNeoXConfig, T.GPTNeoXForCausalLM, **BASE, max_position_embeddings=32, bos_token_id=0, eos_token_id=0),
        causal_lm,
        ("gpt_neox.layers.0.mlp.dense_h_to_4h", "gpt_neox.layers.0.mlp.dense_4h_to_h"),
        f"{NEOX}.query_key_value",
        f"{NEOX}.dense",
        PER_HEAD_QKV,
    ),
    family_with_packed(  # BloomAttention._reshape: view(batch, seq, num_heads, 3, head_dim)
        "bloom",
        hf(T.BloomConfig, T.BloomForCausalLM, vocab_size=VOCAB, hidden_size=DIM, n_layer=1, n_head=HEADS),
        causal_lm,
        FALCON_FF["ff"],
        f"{BLOOM}.query_key_value",
        f"{BLOOM}.dense",
        PER_HEAD_QKV,
    ),
    family_with_packed(  # FalconAttention, multi_query: split([num_heads, 1, 1], dim=-2)
        "falcon-multi-query",
        hf(T.FalconConfig, T.FalconForCausalLM, **BASE, multi_query=True, bos_token_id=0, eos_token_id=0),
        causal_lm,
        FALCON_FF["ff"],
        f"{FALCON}.query_key_value",
        f"{FALCON}.dense",
        MULTI_QUERY,
    ),
    family_with_packed(  # new_decoder_architecture: view(..., num_kv_heads, -1, head_dim): group queries, K, V
        "falcon-grouped",
        hf(
            T.FalconConfig,
            T.FalconForCausalLM,
            **BASE,
            new_decoder_architecture=True,
            num_kv_heads=KV_HEADS,
            bos_token_id=0,
            eos_token_id=0,
        ),
        causal_lm,
        FALCON_FF["ff"],
        f"{FALCON}.query_key_value",
        f"{FALCON}.dense",
        per_head(KV_HEADS, ("q", HEADS // KV_HEADS * HEAD_DIM), ("k", HEAD_DIM), ("v", HEAD_DIM)),
    ),
    family_with_packed(  # else: unflatten(-2, (num_heads, 3)): interleaved per head
        "falcon-per-head",
        hf(T.FalconConfig, T.FalconForCausalLM, **BASE, multi_query=False, bos_token_id=0, eos_token_id=0),
        causal_lm,
        FALCON_FF["ff"],
        f"{FALCON}.query_key_value",
        f"{FALCON}.dense",
        PER_HEAD_QKV,
    ),
    family_with_packed(  # MptAttention: mixed_qkv.chunk(3, dim=2)
        "mpt",
        hf(T.MptConfig, T.MptForCausalLM, vocab_size=VOCAB, d_model=DIM, n_layers=1, n_heads=HEADS, max_seq_len=32),
        causal_lm,
        ("transformer.blocks.0.ffn.up_proj", "transformer.blocks.0.ffn.down_proj"),
        "transformer.blocks.0.attn.Wqkv",
        "transformer.blocks.0.attn.out_proj",
        THIRDS,
    ),
    family_with_packed(  # CodeGenAttention: mp_num = 4; view(..., -1, 3 * local_dim); query, value, key = split
        "codegen",
        hf(T.CodeGenConfig, T.CodeGenForCausalLM, **GPT, n_inner=HIDDEN, rotary_dim=4),
        causal_lm,
        ("transformer.h.0.mlp.fc_in", "transformer.h.0.mlp.fc_out"),
        "transformer.h.0.attn.qkv_proj",
        "transformer.h.0.attn.out_proj",
        per_head(4, ("q", DIM // 4), ("v", DIM // 4), ("k", DIM // 4)),
    ),
    family_with_packed(  # GPTBigCodeAttention, multi_query: split((embed_dim, kv_dim, kv_dim))
        "gpt-bigcode-multi-query",
        hf(T.GPTBigCodeConfig, T.GPTBigCodeForCausalLM, **GPT, n_inner=HIDDEN, multi_query=True),
        causal_lm,
        BIGCODE_FF["ff"],
        f"{BIGCODE}.c_attn",
        f"{BIGCODE}.c_proj",
        MULTI_QUERY,
    ),
    family_with_packed(  # else: view(..., num_heads, 3 * head_dim).split(3 * [head_dim])
        "gpt-bigcode-per-head",
        hf(T.GPTBigCodeConfig, T.GPTBigCodeForCausalLM, **GPT, n_inner=HIDDEN, multi_query=False),
        causal_lm,
        BIGCODE_FF["ff"],
        f"{BIGCODE}.c_attn",
        f"{BIGCODE}.c_proj",
        PER_HEAD_QKV,
    ),
    Family(
        "gpt-j",
        hf(T.GPTJConfig, T.GPTJForCausalLM, **GPT, n_inner=HIDDEN, rotary_dim=4),
        causal_lm,
        {
            "ff": ("transformer.h.0.mlp.fc_in", "transformer.h.0.mlp.fc_out"),
            **attention(GPTJ_ATTN, "q_proj", "k_proj", "v_proj", "out_proj"),
        },
    ),
    Family(
        "opt",
        hf(
            T.OPTConfig,
            T.OPTForCausalLM,
            vocab_size=VOCAB,
            hidden_size=DIM,
            ffn_dim=HIDDEN,
            num_hidden_layers=1,
            num_attention_heads=HEADS,
            max_position_embeddings=32,
            word_embed_proj_dim=DIM,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
        ),
        causal_lm,
        {
            "ff": ("model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2"),
            **attention("model.decoder.layers.0.self_attn", "q_proj", "k_proj", "v_proj", "out_proj"),
        },
    ),
    bert_like("roberta", T.RobertaConfig, T.RobertaForSequenceClassification, "roberta"),
    bert_like("xlm-roberta", T.XLMRobertaConfig, T.XLMRobertaForSequenceClassification, "roberta"),
    bert_like("electra", T.ElectraConfig, T.ElectraForSequenceClassification, "electra", embedding_size=16),
    bert_like(
        "deberta-v2",
        T.DebertaV2Config,
        T.DebertaV2ForSequenceClassification,
        "deberta",
        "query_proj",
        "key_proj",
        "value_proj",
    ),
    Family(
        "distilbert",
        hf(
            T.DistilBertConfig,
            T.DistilBertForSequenceClassification,
            vocab_size=VOCAB,
            dim=DIM,
            hidden_dim=HIDDEN,
            n_layers=1,
            n_heads=HEADS,
            max_position_embeddings=32,
        ),
        classify_text,
        {
            "ff": (f"{DISTIL}.ffn.lin1", f"{DISTIL}.ffn.lin2"),
            **attention(f"{DISTIL}.attention", "q_lin", "k_lin", "v_lin", "out_lin"),
        },
    ),
    Family(
        "albert",
        hf(T.AlbertConfig, T.AlbertForSequenceClassification, **BASE, embedding_size=16, max_position_embeddings=32),
        classify_text,
        {
            "ff": (f"{ALBERT}.ffn", f"{ALBERT}.ffn_output"),
            **attention(f"{ALBERT}.attention", "query", "key", "value", "dense"),
        },
    ),
    family_with_packed(  # ModernBertAttention: qkv.view(..., 3, -1, head_dim).unbind(dim=-3)
        "modernbert",
        hf(
            T.ModernBertConfig,
            T.ModernBertForSequenceClassification,
            **BASE,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
        ),
        classify_text,
        ("model.layers.0.mlp.Wi", "model.layers.0.mlp.Wo"),
        "model.layers.0.attn.Wqkv",
        "model.layers.0.attn.Wo",
        THIRDS,
    ),
    enc_dec("bart", T.BartConfig, T.BartForConditionalGeneration),
    enc_dec("mbart", T.MBartConfig, T.MBartForConditionalGeneration),
    enc_dec("pegasus", T.PegasusConfig, T.PegasusForConditionalGeneration),
    enc_dec(
        "whisper",
        T.WhisperConfig,
        T.WhisperForConditionalGeneration,
        loss=speech_to_text,
        num_mel_bins=8,
        max_source_positions=16,
        max_target_positions=16,
    ),
    two_towers("clip", T.CLIPConfig, T.CLIPModel),
    two_towers("siglip", T.SiglipConfig, T.SiglipModel),  # its vision pooling head (attention + MLP) stays dense
    vit_like("deit", T.DeiTConfig, T.DeiTForImageClassification, "deit.layers.0"),
    vit_like("beit", T.BeitConfig, T.BeitForImageClassification, "beit.layers.0"),
    vit_like("dinov2", T.Dinov2Config, T.Dinov2ForImageClassification, "dinov2.encoder.layer.0", mlp_ratio=2),
    Family(
        "swin",  # two stages; the patch merging between them (downsample.reduction) is no feed-forward layer
        hf(
            T.SwinConfig,
            T.SwinForImageClassification,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[2, 4],
            image_size=16,
            patch_size=2,
            window_size=4,
            mlp_ratio=2.0,
        ),
        lambda model, gen: classify_image(model, gen, size=16),
        {
            "ff": tuple(f"{b}.mlp.{fc}" for b in SWIN for fc in ("fc1", "fc2")),
            "q": tuple(f"{b}.attention.q_proj" for b in SWIN),
            "k": tuple(f"{b}.attention.k_proj" for b in SWIN),
            "v": tuple(f"{b}.attention.v_proj" for b in SWIN),
            "attn_out": tuple(f"{b}.attention.o_proj" for b in SWIN),
        },
    ),
    Family(
        "wav2vec2",
        hf(
            T.Wav2Vec2Config,
            T.Wav2Vec2ForSequenceClassification,
            **BASE,
            conv_dim=(16, 16),
            conv_stride=(5, 2),
            conv_kernel=(10, 3),
            num_conv_pos_embeddings=4,
            num_conv_pos_embedding_groups=2,
            classifier_proj_size=16,
            mask_time_prob=0.0,
        ),
        classify_audio,
        {
            "ff": (f"{W2V}.feed_forward.intermediate_dense", f"{W2V}.feed_forward.output_dense"),
            **attention(f"{W2V}.attention", "q_proj", "k_proj", "v_proj", "out_proj"),
        },
    ),
    Family(
        "torch-transformer",  # nn.MultiheadAttention's in_proj_weight is [Q | K | V]
        TorchTransformer,
        torch_transformer_loss,
        {
            "ff": tuple(f"{layer}.{fc}" for layer in TORCH for fc in ("linear1", "linear2")),
            **{role: tuple(f"{a}.in_proj_weight" for a in TORCH_ATTN) for role in ("q", "k", "v")},
            "attn_out": tuple(f"{a}.out_proj" for a in TORCH_ATTN),
        },
        {f"{a}.in_proj_weight": THIRDS for a in TORCH_ATTN},
    ),
)


# ------------------------------------------------------------------ helpers
def built(family: Family) -> nn.Module:
    torch.manual_seed(0)
    return family.build()


def tensor_of(model: nn.Module, name: str) -> torch.Tensor:
    """The tensor a name in `Family.expected` stands for: a module's weight, or ``module.param``."""
    module_name, _, param = name.rpartition(".")
    try:
        return model.get_submodule(name).weight
    except AttributeError:
        return getattr(model.get_submodule(module_name), param)


def state_key(model: nn.Module, name: str) -> str:
    try:
        model.get_submodule(name)
        return f"{name}.weight"
    except AttributeError:
        return name  # already module.param


def out_dim(tensor: torch.Tensor) -> int:
    return 1 if tensor.dim() == 3 else 0  # Linear [out, in]; experts [experts, out, in]


def expected_rows(family: Family, model: nn.Module, role: str) -> dict[str, set[int]]:
    rows = {}
    for name in family.expected[role]:
        if name in family.packed:
            rows[name] = {r for start, stop in family.packed[name][role] for r in range(start, stop)}
        else:
            tensor = tensor_of(model, name)
            rows[name] = set(range(tensor.shape[out_dim(tensor)]))
    return rows


def taken_rows(targets) -> dict[str, set[int]]:
    rows: dict[str, set[int]] = {}
    for t in targets:
        for seg in t.segments:
            period = t.out_size // seg.groups
            rows.setdefault(t.qualified_name, set()).update(
                g * period + r for g in range(seg.groups) for r in range(seg.start, seg.stop)
            )
    return rows


def nmflow_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "nmflow" in str(w.message)]


# ------------------------------------------------------------------ the tests
@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_each_role_takes_exactly_the_rows_written_out_from_the_model_source(family):
    model = built(family)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for role in family.expected:
            plan = nmflow.plan(model, nmflow.Recipe("ste", {role: "1:4"}), 10, verbose=False)
            assert taken_rows(plan.targets) == expected_rows(family, model, role), role
        whole = nmflow.plan(
            model, nmflow.Recipe("ste", {"ff": "1:4", "qkv": "1:4", "attn_out": "1:4"}), 10, verbose=False
        )

    assert {t.qualified_name for t in whole.targets} == {name for names in family.expected.values() for name in names}
    assert not nmflow_warnings(caught)


RECIPE = {"ff": "1:4", "q": "1:4", "v": "1:2"}  # K and the attention output stay dense
PATTERNS = {"ff": (1, 4), "experts": (1, 4), "q": (1, 4), "k": None, "v": (1, 2), "attn_out": None}


@pytest.mark.parametrize("family", FAMILIES, ids=repr)
def test_training_then_finalize_leaves_exact_nm_rows_and_a_lossless_compressed_file(family, tmp_path):
    model = built(family)
    keys = set(model.state_dict())
    recipe = nmflow.Recipe("mdgf-exp", RECIPE, dense_steps=1, finetune_steps=1)
    sp = nmflow.sparsify(model, recipe, total_steps=4, verbose=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(4):
        loss = family.loss(model, gen)
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sp.step()
    sp.finalize()

    assert set(model.state_dict()) == keys
    for role, pattern in PATTERNS.items():
        for name, rows in expected_rows(family, model, role).items() if role in family.expected else ():
            weight = tensor_of(model, name).detach()
            block = weight.index_select(out_dim(weight), torch.tensor(sorted(rows)))
            if pattern is None:
                assert (block != 0).all(), f"{name}[{role}] should be dense"
            else:
                counts = nonzeros_per_group(block, pattern[1], block.dim() - 1)
                assert (counts == pattern[0]).all(), f"{name}[{role}]: {counts.unique().tolist()} per group"
    assert all(record["realized"] == record["target"] for record in sp.verify())

    path = tmp_path / "model.safetensors"
    stored = nmflow.save_compressed(model, path)
    state, loaded = model.state_dict(), nmflow.load_compressed(path)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())
    assert {state_key(model, name) for name in family.expected["ff"]} <= set(stored)


def test_the_readme_lists_exactly_the_tested_families():
    text = README.read_text().split("written out from its transformers source:\n\n", 1)[1].split("\n\n", 1)[0]
    text = re.sub(r"\(.*?\)", "", text.replace("\n", " "))  # variants in parentheses are tested ones too
    aliases = {"torchstransformerlayers": "torch", "timmstyleblocks": "timm"}
    listed = {
        aliases.get(n, n) for n in (re.sub(r"[^a-z0-9]", "", item.lower()) for item in re.split(r",| and ", text))
    }
    tested = {re.sub(r"[^a-z0-9]", "", f.name) for f in (*FIRST_FAMILIES, *FAMILIES)}

    assert all(any(t.startswith(name) for t in tested) for name in listed), listed
    assert all(any(t.startswith(name) for name in listed) for t in tested), tested
    assert len(listed) >= 45
