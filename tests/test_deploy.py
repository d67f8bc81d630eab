"""nmflow.deploy: every backend against a float64 dense product, round trips, checkpoints, fallback, bad input."""

import warnings

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import nmflow
import nmflow.inference as inference
from nmflow import compressed
from nmflow.core.layouts import weight_input_dims
from nmflow.inference import BACKENDS, NMLinear, dispatch, kernel

PATTERNS = ((1, 2), (2, 4), (1, 4), (1, 8), (3, 8), (1, 16), (2, 16), (1, 32), (4, 64))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.fixture(scope="module", autouse=True)
def built_kernel():
    """Build (or load torch's cached build of) the kernel once for the file; these tests need it."""
    assert kernel.available(), kernel.unavailable_reason()
    assert kernel.isa() in ("avx512-bf16", "avx512", "avx2", "portable")


def random_nm(out_features: int, in_features: int, n: int, m: int, dtype=torch.float32, seed: int = 0):
    """A weight with at most n non-zeros in every group of m inputs (some kept entries are zero too)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen)
    keep = torch.rand(out_features, in_features // m, m, generator=gen).argsort(-1)[..., :n]
    mask = torch.zeros(out_features, in_features // m, m, dtype=torch.bool).scatter_(-1, keep, True)
    mask &= torch.rand(mask.shape, generator=gen) > 0.1
    return torch.where(mask.reshape(out_features, in_features), weight, 0.0).to(dtype)  # +0.0 where dropped


def layer_from(weight: torch.Tensor, bias: torch.Tensor | None, backend: str) -> NMLinear:
    holder = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None))
    holder[0].weight.data, holder[0].bias = weight, None if bias is None else nn.Parameter(bias)
    nmflow.deploy(holder, backend=backend, layers=["0"], verbose=False)
    return holder[0]


def check_close(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Within fp32 accumulation error plus one rounding to the output dtype, of the float64 product."""
    reference = x.double() @ weight.double().t()
    magnitude = x.double().abs() @ weight.double().abs().t()
    if bias is not None:
        reference, magnitude = reference + bias.double(), magnitude + bias.double().abs()
    tolerance = (2 * EPS[y.dtype] + x.shape[-1] * 2.0**-24) * magnitude + 1e-30
    assert y.dtype == x.dtype and y.shape == reference.shape
    assert bool(((y.double() - reference).abs() <= tolerance).all())


@settings(max_examples=40, deadline=None)
@given(
    pattern=st.sampled_from(PATTERNS),
    out_features=st.integers(1, 40),
    groups=st.integers(1, 5),
    dtype=st.sampled_from(DTYPES),
    batch=st.sampled_from((0, 1, 2, 3, 4, 5, 7, 8, 17, 33, 70)),
    with_bias=st.booleans(),
    strided=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_every_backend_matches_the_dense_product(pattern, out_features, groups, dtype, batch, with_bias, strided, seed):
    n, m = pattern
    weight = random_nm(out_features, groups * m, n, m, dtype, seed)
    bias = torch.randn(out_features).to(dtype) if with_bias else None
    x = torch.randn(batch, 3, groups * m * (2 if strided else 1)).to(dtype)
    x = x[:, :, ::2] if strided else x  # non-contiguous input
    for name, backend in BACKENDS.items():
        layer = layer_from(weight.clone(), None if bias is None else bias.clone(), name)
        if backend.unavailable(layer, x) is not None:
            continue
        with torch.no_grad():
            check_close(layer(x), x, weight, bias)
    if batch:  # the kernel's portable path (the one other CPUs compile), called directly
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        y = kernel.linear(rows, layer.values, layer.indices, layer.bias, layer.n, layer.m, layer.bits, portable=True)
        check_close(y, rows, weight, bias)


def test_kernel_splits_rows_over_threads():
    weight, x = random_nm(301, 64, 1, 16, seed=1), torch.randn(9, 64)
    layer = layer_from(weight, None, "nm")
    torch.set_num_threads(2)  # the autouse fixture restores it
    for rows in (x[:1], x[:3], x):
        check_close(layer(rows), rows, weight, None)


@pytest.mark.parametrize("batch", [31, 32, 33, 128, 129, 300])
def test_2_4_bf16_batches_match_the_dense_product(batch):
    """From 32 rows a 2:4 bf16 layer runs with batch rows as the vector lanes, up to 128 at a time."""
    weight, bias = random_nm(85, 96, 2, 4, torch.bfloat16, seed=batch), torch.randn(85).to(torch.bfloat16)
    layer = layer_from(weight.clone(), bias.clone(), "nm")
    torch.set_num_threads(2)  # the autouse fixture restores it
    x = torch.randn(batch, 96).to(torch.bfloat16)
    with torch.no_grad():
        check_close(layer(x), x, weight, bias)


def test_positions_out_of_order_in_a_group_still_give_the_right_product():
    """No nmflow file has them, but a layer built from such parts must not take the path that assumes order."""
    weight = random_nm(48, 64, 2, 4, torch.bfloat16, seed=3)
    parts = layer_from(weight.clone(), None, "nm").file_parts()
    values = parts[compressed.VALUES].reshape(48, 32).clone()
    positions = compressed.unpack_bits(parts[compressed.INDICES], 2, values.numel()).reshape(48, 32)
    for row, entry in ((5, 6), (40, 30)):  # swap the two kept entries of a group: the same weight
        values[row, [entry, entry + 1]] = values[row, [entry + 1, entry]]
        positions[row, [entry, entry + 1]] = positions[row, [entry + 1, entry]]
    assert bool((positions[5, 6] > positions[5, 7]) & (positions[40, 30] > positions[40, 31]))
    swapped_parts = {compressed.VALUES: values.reshape(-1), compressed.INDICES: compressed.pack_bits(positions, 2)}
    info = {"n": 2, "m": 4, "dim": 1, "shape": [48, 64], "index_bits": 2}
    layer = NMLinear(swapped_parts, info, None, backend="nm")
    x = torch.randn(64, 64).to(torch.bfloat16)
    with torch.no_grad():
        check_close(layer(x), x, weight, None)


def tiny_llama(tie_word_embeddings: bool = False) -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie_word_embeddings,
    )
    config.vocab_size = 96
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2() -> nn.Module:
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=96, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def finalized(model: nn.Module, sparsity: dict) -> nn.Module:
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0, 0.2)  # random init with larger weights, so that greedy tokens depend on them
    nmflow.sparsify(model, nmflow.Recipe("ste", sparsity=sparsity, dense_fraction=0), total_steps=4).finalize()
    return model


SPARSITY = {"llama": {"ff": "1:16", "qk": "1:8"}, "gpt2": {"ff": "1:16", "attn_out": "2:8"}}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def family(request):
    build = tiny_llama if request.param == "llama" else tiny_gpt2
    return request.param, lambda: finalized(build(), SPARSITY[request.param])


def state_bytes(model: nn.Module) -> dict[str, bytes]:
    return {
        k: (v.dtype, v.shape, v.reshape(-1).contiguous().view(torch.uint8).tolist())
        for k, v in model.state_dict().items()
    }


def test_generate_equals_the_dense_model_and_undeploy_is_bitwise(family):
    name, build = family
    model = build()
    if name == "llama":
        model.model.layers[0].mlp.down_proj.weight.data[0, 1:16] = -0.0  # dropped -0.0 entries come back too
    before, types = state_bytes(model), {k: type(v) for k, v in model.named_modules()}
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        table = nmflow.deploy(model, verbose=False)
        assert {row.pattern for row in table} == set(SPARSITY[name].values())
        assert all(isinstance(model.get_submodule(row.name), NMLinear) for row in table)
        assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0), expected)
    assert nmflow.undeploy(model) == len(table)
    assert {k: type(v) for k, v in model.named_modules()} == types
    assert state_bytes(model) == before
    assert all(p.requires_grad for p in model.parameters())


def test_deployed_bytes_match_the_compressed_checkpoint(family, tmp_path):
    _, build = family
    model = build()
    nmflow.save_compressed(model, tmp_path / "m.safetensors")
    header, stored = nmflow.compressed.read_compressed(tmp_path / "m.safetensors")
    nmflow.deploy(model, backend="nm", verbose=False)
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    deployed = sum(t.numel() * t.element_size() for t in tensors)
    file_bytes = sum(t.numel() * t.element_size() for t in stored.values())
    assert deployed <= 1.05 * file_bytes


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor with memory (not on the meta device) that an aten operator returns."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, tuple | list) else (out,):
            if isinstance(item, torch.Tensor) and item.device.type != "meta":
                self.shapes.add(tuple(item.shape))
        return out


def test_deploy_from_a_checkpoint_never_builds_a_dense_weight(tmp_path):
    source = finalized(tiny_llama(), {"ff": "1:16"})
    nmflow.save_compressed(source, tmp_path / "m.safetensors")
    with torch.device("meta"):
        model = tiny_llama()  # no dense weight at all, until deploy loads the compressed ones
    with pytest.raises(nmflow.ConfigError, match="rotary_emb.inv_freq is on the meta device"):
        nmflow.deploy(model, checkpoint=tmp_path / "m.safetensors", verbose=False)
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)  # its buffer is computed, not stored
    with ShapeRecorder() as recorder:
        table = nmflow.deploy(model, checkpoint=tmp_path / "m.safetensors", backend="nm", verbose=False)
    dense_shapes = {(128, 64), (64, 128)}  # the FF weights, [out, in] and [in, out]
    assert len(table) == 6 and not recorder.shapes & dense_shapes
    with ShapeRecorder() as recorder:  # the recorder does see a dense weight when one is built
        model.model.layers[0].mlp.up_proj.dense_weight()
    assert recorder.shapes & dense_shapes
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, source(ids).logits)


def unique_tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, a tensor held under two names counted once."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_deploy_from_a_checkpoint_keeps_tied_weights_tied(name, tmp_path):
    """The LM head and the input embedding stay one Parameter, as the model declares, not two loaded copies."""

    def meta_model() -> nn.Module:
        with torch.device("meta"):
            model = build()
        if name == "llama":
            model.model.rotary_emb = type(model.model.rotary_emb)(model.config)  # its buffer is computed, not stored
        return model

    build = (lambda: tiny_llama(tie_word_embeddings=True)) if name == "llama" else tiny_gpt2
    source = finalized(build(), SPARSITY[name])
    assert source.lm_head.weight is source.get_input_embeddings().weight
    nmflow.save_compressed(source, tmp_path / "m.safetensors")
    model = meta_model()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    table = nmflow.deploy(model, checkpoint=tmp_path / "m.safetensors", backend="nm", verbose=False)
    embedding = model.get_input_embeddings().weight
    assert model.lm_head.weight is embedding and isinstance(embedding, nn.Parameter) and embedding.requires_grad
    assert [n for n, p in model.named_parameters(remove_duplicate=False) if p is embedding] == [
        n for n, p in source.named_parameters(remove_duplicate=False) if p is source.get_input_embeddings().weight
    ]
    assert nmflow.deploy(source, backend="nm", verbose=False) == table  # the path without a file
    assert unique_tensor_bytes(model) == unique_tensor_bytes(source)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, source(ids).logits)

    untied = finalized(build(), SPARSITY[name]).state_dict()
    untied["lm_head.weight"] = untied["lm_head.weight"] + 1  # a file whose two copies of the tie differ
    nmflow.save_compressed(untied, tmp_path / "untied.safetensors", layouts=weight_input_dims(build()))
    model = meta_model()
    with pytest.raises(nmflow.ConfigError, match="lm_head.weight differ, but they are one tensor in the model"):
        nmflow.deploy(model, checkpoint=tmp_path / "untied.safetensors", verbose=False)
    assert model.get_input_embeddings().weight.device.type == "meta"  # refused before the model changed


@pytest.fixture
def no_kernel(monkeypatch):
    """The kernel as on a machine where it cannot be built."""

    def fail():
        raise RuntimeError("simulated: no C++ compiler")

    monkeypatch.setattr(kernel, "_build", fail)
    monkeypatch.setattr(kernel, "_state", {})
    monkeypatch.setattr(inference, "_warned", False)
    monkeypatch.setattr(dispatch, "DECISIONS", {})


def test_fallback_when_the_kernel_cannot_be_built(no_kernel):
    weight, x = random_nm(24, 32, 1, 8), torch.randn(5, 32)
    with pytest.warns(RuntimeWarning, match="simulated: no C\\+\\+ compiler"):
        layer = layer_from(weight, None, "auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not per model
        bf16_layer = layer_from(weight.bfloat16(), None, "auto")
    with torch.no_grad():
        check_close(layer(x), x, weight, None)
        check_close(bf16_layer(x.bfloat16()), x.bfloat16(), weight.bfloat16(), None)
    assert set(layer.choices.values()) == {"csr"} and set(bf16_layer.choices.values()) == {"dense-cached"}
    with pytest.raises(nmflow.ConfigError, match="kernel, which is unavailable: RuntimeError: simulated"):
        layer_from(weight, None, "nm")


@given(rows=st.integers(0, 5000))
def test_a_batch_falls_in_the_largest_bucket_not_above_it(rows):
    size = dispatch.bucket(rows)
    assert size in dispatch.BUCKETS and size <= max(rows, 1)
    assert all(b <= size or b > max(rows, 1) for b in dispatch.BUCKETS)


def test_auto_caches_per_bucket_and_obeys_overrides():
    weight = random_nm(16, 64, 1, 16)
    layer = layer_from(weight, None, "auto")
    with torch.no_grad():
        layer(torch.randn(70, 64))
        assert set(layer.choices) == {(torch.float32, "cpu", 1), (torch.float32, "cpu", 64)}
        layer.choices[(torch.float32, "cpu", 4)] = "csr"
        check_close(layer(x := torch.randn(5, 64)), x, weight, None)
    assert "csr" in layer._prepared
    assert all(b.name != "dense-cached" for b in dispatch.candidates(layer, x))
    layer.dense_copies = True  # deploy(dense_copies=True)
    assert "dense-cached" in {b.name for b in dispatch.candidates(layer, x)}
    layer.to(torch.bfloat16)
    assert not layer._prepared and layer.values.dtype == torch.bfloat16 and layer.indices.dtype == torch.uint8
    with torch.no_grad():
        check_close(layer(x.bfloat16()), x.bfloat16(), weight.bfloat16(), None)


def test_bad_input_leaves_the_model_unchanged(tmp_path):
    model = finalized(tiny_llama(), {"ff": "1:16"})
    nmflow.save_compressed(finalized(tiny_gpt2(), {"ff": "1:16"}), tmp_path / "other.safetensors")
    before = state_bytes(model)
    cases = [
        (dict(backend="fastest"), "unknown backend 'fastest'"),
        (dict(layers=["model.layers.0.self_attn.q_proj"]), "q_proj.weight is not N:M"),
        (dict(layers=["model.norm"]), "not nn.Linear/Conv1D layers"),
        (dict(checkpoint=tmp_path / "other.safetensors"), "is not a checkpoint of this model"),
        (dict(checkpoint=tmp_path / "missing.safetensors"), "no such checkpoint file"),
    ]
    for kwargs, message in cases:
        with pytest.raises(nmflow.ConfigError, match=message):
            nmflow.deploy(model, verbose=False, **kwargs)
        assert state_bytes(model) == before and not any(isinstance(m, NMLinear) for m in model.modules())
    nmflow.deploy(model, backend="nm", verbose=False)
    with pytest.raises(nmflow.ConfigError, match="deployed already"):
        nmflow.deploy(model, verbose=False)
    dense = tiny_llama()
    with pytest.raises(nmflow.ConfigError, match="no nn.Linear/Conv1D weight of the model is N:M"):
        nmflow.deploy(dense, verbose=False)
    sparsifying = tiny_llama()
    nmflow.sparsify(sparsifying, nmflow.Recipe("ste", sparsity={"ff": "1:16"}), total_steps=4)
    with pytest.raises(nmflow.ConfigError, match="parametrized\\): call finalize\\(\\) first"):
        nmflow.deploy(sparsifying, verbose=False)


def test_a_checkpoint_with_a_wrong_layer_shape_is_refused(tmp_path):
    small, large = tiny_llama(), tiny_llama()
    large.model.layers[0].mlp.up_proj = nn.Linear(64, 256, bias=False)
    nmflow.save_compressed(finalized(small, {"ff": "1:16"}), tmp_path / "m.safetensors")
    before = state_bytes(large)
    with pytest.raises(nmflow.ConfigError, match="up_proj.weight: stored as shape \\[128, 64\\]"):
        nmflow.deploy(large, checkpoint=tmp_path / "m.safetensors", verbose=False)
    assert state_bytes(large) == before


def test_an_input_that_needs_a_gradient_gets_the_right_one():
    weight = random_nm(8, 32, 1, 8)
    layer = layer_from(weight, None, "nm")
    x = torch.randn(3, 32, requires_grad=True)
    layer(x).pow(2).sum().backward()
    reference = x.detach().clone().requires_grad_()
    (reference @ weight.t()).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad)


def test_nmflow_deploy_is_the_function_of_the_inference_package():
    import nmflow.inference.kernel as kernel_module

    assert nmflow.deploy is inference.deploy and nmflow.inference.kernel is kernel_module is kernel
    holder = nn.Sequential(nn.Linear(32, 8, bias=False))
    holder[0].weight.data = random_nm(8, 32, 1, 8)
    assert [row.pattern for row in nmflow.deploy(holder, verbose=False)] == ["1:8"]
