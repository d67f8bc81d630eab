"""The role table: which module names are which part of a transformer block. Data only.

Like peft's per-architecture defaults, one row per naming convention, each tagged with the families that use
it (checked on tiny models of each family in ``tests/test_families.py``). A row is
``(regex searched at the end of the full module name, roles of its output rows, packed layout)``; the first
row that matches wins. ``roles`` is:

* one role (``("ff",)``): the whole tensor;
* several (``("q", "k", "v")``): a packed projection whose rows are split by the layout named in the third
  column, worked out from the model's config by `nmflow.core.layouts.packed_layout`;
* empty: a layer that is known and stays dense under every role (MoE routers), so it is never reported as
  an unrecognised neighbour of a feed-forward layer.
"""

from __future__ import annotations

__all__ = ["EXPERT_MODULE", "NEVER_SCOPE", "ROLES_WITHIN", "ROLE_RULES"]

_ATTN = r"[A-Za-z_]*(?:attn|attention|Attention)[A-Za-z_]*"  # self_attn, attention, SelfAttention, encoder_attn ...
_ATTN_SCOPE = rf"{_ATTN}(?:\.self|\.attention)?"
_FF_SCOPE = r"(?:mlp|ffn|feed_forward|shared_expert|DenseReluDense)"
_FF_LEAF = (
    r"(?:fc1|fc2|c_fc|c_proj|gate_proj|up_proj|down_proj|gate_up_proj|fc_in|fc_out|dense_h_to_4h|dense_4h_to_h"
    r"|lin1|lin2|Wi|Wo|intermediate_dense|output_dense|wi|wi_0|wi_1|wo)"
)

ROLE_RULES: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    # ---- attention output (BERT's `attention.output.dense` before the feed-forward rule for `output.dense`)
    (r"attention\.output\.dense", ("attn_out",), None),  # BERT, RoBERTa, XLM-R, ELECTRA, DeBERTa-v2
    # LLaMA family, T5, OPT/BART/Whisper, CLIP, ViT, GPT-2, GPT-J, NeoX/BLOOM/Falcon/Phi, DistilBERT, ModernBERT
    (rf"{_ATTN}\.(?:o_proj|o|out_proj|proj|c_proj|dense|out_lin|Wo)", ("attn_out",), None),
    # ---- separate query, key and value projections
    (rf"{_ATTN_SCOPE}\.(?:q_proj|q|query|q_attn|q_lin|query_proj)", ("q",), None),
    (rf"{_ATTN_SCOPE}\.(?:k_proj|k|key|k_lin|key_proj)", ("k",), None),
    (rf"{_ATTN_SCOPE}\.(?:v_proj|v|value|v_lin|value_proj)", ("v",), None),
    # ---- packed projections: the rows of each role come from the layout (see nmflow.core.layouts)
    (r"crossattention\.c_attn", ("k", "v"), "c_attn_cross"),  # GPT-2 cross-attention: [K | V]
    (r"attn\.c_attn", ("q", "k", "v"), "c_attn"),  # GPT-2, nanoGPT: thirds; GPTBigCode: multi-query or per head
    (r"attn\.qkv", ("q", "k", "v"), "qkv"),  # timm blocks: thirds
    (rf"{_ATTN}\.query_key_value", ("q", "k", "v"), "query_key_value"),  # GPT-NeoX, BLOOM, Falcon
    (rf"{_ATTN}\.qkv_proj", ("q", "k", "v"), "qkv_proj"),  # Phi-3: [Q | K | V] with kv heads; CodeGen
    (rf"{_ATTN}\.Wqkv", ("q", "k", "v"), "Wqkv"),  # MPT, ModernBERT: thirds
    # ---- mixture of experts: routers stay dense; nn.Linear experts (3-D experts: see EXPERT_MODULE)
    (r"(?:mlp|block_sparse_moe|moe)\.(?:gate|router)|shared_expert_gate", (), None),  # Mixtral, Qwen2-MoE
    (rf"experts\.\d+\.(?:w1|w2|w3|{_FF_LEAF})", ("experts",), None),  # Mixtral/Qwen2-MoE before transformers 5
    # ---- feed-forward
    (r"(?:intermediate|output)\.dense", ("ff",), None),  # BERT, RoBERTa, XLM-R, ELECTRA, DeBERTa-v2
    # LLaMA family, GPT-2/J/NeoX, BLOOM, Falcon, MPT, CodeGen, Phi, Phi-3, ViT, CLIP, DistilBERT, ModernBERT,
    # Wav2Vec2, T5, Qwen2-MoE's shared expert, timm blocks
    (rf"{_FF_SCOPE}\.{_FF_LEAF}", ("ff",), None),
    (r"(?:layers|layer|h|blocks)\.\d+\.(?:fc1|fc2)", ("ff",), None),  # OPT, BART, mBART, Pegasus, Whisper
    (r"albert_layers\.\d+\.(?:ffn|ffn_output)", ("ff",), None),  # ALBERT
)

# 3-D expert weights ([experts, out, in], or [experts, in, out] where the module says ``is_transposed``)
# are the parameters of a module whose name ends so (Mixtral, Qwen2-MoE, ... in transformers 5).
EXPERT_MODULE = r"experts"

# Nothing inside these modules takes a role (SigLIP's pooling head has its own attention and MLP).
NEVER_SCOPE = r"(?:^|\.)(?:head|heads|pooler|classifier|lm_head)\."

# Recipe keys that name several roles. A key naming one of those roles itself takes it first:
# {"ff": "2:4", "experts": "1:8"} puts the routed experts at 1:8 and the rest of the feed-forward at 2:4.
ROLES_WITHIN: dict[str, tuple[str, ...]] = {"qk": ("q", "k"), "qkv": ("q", "k", "v"), "ff": ("ff", "experts")}
