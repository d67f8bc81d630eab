"""The compressed N:M checkpoint: bitwise round trips, the byte layout against hand-worked blobs, sizes, bad files."""

import json
import math
import os
import struct
import tempfile
import zlib

import pytest
import safetensors.torch
import torch
import transformers
from helpers import write_compressed
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn
from transformers.pytorch_utils import Conv1D

import nmflow
from nmflow.compressed import pack_bits, unpack_bits

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PATTERNS = ((2, 4), (1, 8), (1, 16), (1, 32), (3, 8))
INT_VIEW = {4: torch.int32, 2: torch.int16}


def assert_bitwise_equal(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for name, tensor in expected.items():
        got = actual[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.reshape(-1).contiguous().view(torch.uint8)), name


def stored(path) -> tuple[dict, dict]:
    """The raw tensors and the nmflow header of a file, read with safetensors directly."""
    with safe_open(str(path), framework="pt") as reader:
        return {key: reader.get_tensor(key) for key in reader.keys()}, json.loads(reader.metadata()["nmflow"])  # noqa: SIM118


def sparse_weight(shape, n, m, dim, dtype) -> torch.Tensor:
    weight = torch.randn(shape).to(dtype)
    return weight * nmflow.nm_mask(weight, n, m, dim=dim)


def round_trip(model: nn.Module, path) -> dict:
    chosen = nmflow.save_compressed(model, path)
    loaded = nmflow.load_compressed(path)
    assert_bitwise_equal(loaded, model.state_dict())
    return chosen


# ------------------------------------------------------------------ bit packing
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 11).flatmap(lambda bits: st.tuples(st.just(bits), st.lists(st.integers(0, 2**bits - 1)))))
def test_bit_packing_round_trips_and_matches_a_little_endian_integer(case):
    bits, values = case
    packed = pack_bits(torch.tensor(values, dtype=torch.int64), bits)
    as_integer = sum(value << (i * bits) for i, value in enumerate(values))
    expected = as_integer.to_bytes(math.ceil(len(values) * bits / 8), "little")
    assert packed.dtype == torch.uint8 and bytes(packed.tolist()) == expected
    assert unpack_bits(packed, bits, len(values)).tolist() == values


# ------------------------------------------------------------------ round trips per layout
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "m"), PATTERNS, ids=lambda v: str(v))
def test_linear_round_trips_bitwise_with_its_exact_pattern(tmp_path, n, m, dtype):
    model = nn.Linear(64, 12).to(dtype)
    with torch.no_grad():
        model.weight.copy_(sparse_weight((12, 64), n, m, 1, dtype))
    chosen = round_trip(model, tmp_path / "ckpt.safetensors")
    assert chosen == {"weight": f"{n}:{m}"}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpt2_conv1d_groups_along_dim_0(tmp_path, dtype):
    model = nn.ModuleDict({"c_fc": Conv1D(nf=48, nx=32), "c_proj": Conv1D(nf=32, nx=48)}).to(dtype)
    with torch.no_grad():
        model.c_fc.weight.copy_(sparse_weight((32, 48), 1, 16, 0, dtype))  # [in, out]: groups run down columns
        model.c_proj.weight.copy_(sparse_weight((48, 32), 2, 4, 0, dtype))
    path = tmp_path / "ckpt.safetensors"
    assert round_trip(model, path) == {"c_fc.weight": "1:16", "c_proj.weight": "2:4"}
    assert {name: info["dim"] for name, info in stored(path)[1]["tensors"].items()} == {
        "c_fc.weight": 0,
        "c_proj.weight": 0,
    }


def test_conv2d_groups_along_input_channels(tmp_path):
    model = nn.Conv2d(32, 6, kernel_size=3)
    with torch.no_grad():
        model.weight.copy_(sparse_weight((6, 32, 3, 3), 1, 8, 1, torch.float32))
    assert round_trip(model, tmp_path / "ckpt.safetensors") == {"weight": "1:8"}


def test_multihead_attention_in_proj_is_compressed_only_when_sparse_throughout(tmp_path):
    attention = nn.MultiheadAttention(32, 2)
    with torch.no_grad():
        attention.in_proj_weight.copy_(sparse_weight((96, 32), 1, 8, 1, torch.float32))
    assert round_trip(attention, tmp_path / "all.safetensors") == {"in_proj_weight": "1:8"}

    with torch.no_grad():  # only the Q block sparse, as `qk`-less recipes leave a packed QKV: stored dense
        attention.in_proj_weight.copy_(torch.randn(96, 32))
        attention.in_proj_weight[:32] *= nmflow.nm_mask(attention.in_proj_weight[:32], 1, 8)
    path = tmp_path / "q_only.safetensors"
    chosen = round_trip(attention, path)
    assert "in_proj_weight" not in chosen
    assert torch.equal(stored(path)[0]["in_proj_weight"], attention.in_proj_weight)


def test_fewer_than_n_nonzeros_zeros_and_negative_zeros_round_trip(tmp_path):
    weight = sparse_weight((16, 64), 3, 8, 1, torch.bfloat16)
    weight[0] = 0.0
    weight[1] = -0.0
    weight[2, :8] = torch.tensor([0.0, -0.0, 5.0, 0.0, -0.0, 0.0, 0.0, -0.0])
    weight[3, ::3] = 0.0  # some kept entries become zeros of either sign
    weight[4, 1::3] = -0.0
    state = {"w": weight, "bias": torch.tensor([-0.0, 0.0, 1.0])}
    path = tmp_path / "ckpt.safetensors"
    chosen = nmflow.save_compressed(state, path, layouts={"w": 1})
    assert set(chosen) == {"w"}
    assert_bitwise_equal(nmflow.load_compressed(path), state)


def test_stored_blobs_match_a_hand_worked_example(tmp_path):
    # fp32, groups along dim 1, the file has -0.0 so dropped-zero signs are costed:
    #   M=2: N=1, 8 kept: 32 B values + 1 B indices + 1 B signs = 34
    #   M=4: N=2, 8 kept: 32 + 2 + 1 = 35
    #   M=8: N=3, 6 kept: 24 + ceil(18 / 8) = 3 + ceil(10 / 8) = 2 -> 29 (dense: 64) -> 3:8
    weight = torch.tensor([[1.0, -0.0, 0.0, 2.0, 0.0, -0.0, 0.0, 0.0], [0.0, 0.0, -3.0, 0.0, 4.0, 0.0, 0.0, 5.0]])
    path = tmp_path / "ckpt.safetensors"
    assert nmflow.save_compressed({"w": weight}, path, layouts={"w": 1}) == {"w": "3:8"}
    tensors, header = stored(path)
    # row 0 keeps its non-zeros 0, 3 and pads with its lowest-index zero 1 (a -0.0, kept as such)
    assert tensors["w::nm.values"].view(torch.int32).tolist() == (
        torch.tensor([1.0, -0.0, 2.0, -3.0, 4.0, 5.0]).view(torch.int32).tolist()
    )
    # positions 0 1 3 | 2 4 7 at 3 bits, LSB first: 000 100 110 010 001 111 -> bytes 0b11001000, 0b11000100, 0b11
    assert tensors["w::nm.indices"].tolist() == [200, 196, 3]
    # dropped entries: row 0 positions 2 4 5 6 7 (5 is -0.0), row 1 positions 0 1 3 5 6 -> bit 2 set
    assert tensors["w::nm.zero_signs"].tolist() == [4, 0]
    assert header["version"] == 2 and header["order"] == ["w"]
    assert header["tensors"]["w"] == {
        "n": 3,
        "m": 8,
        "dim": 1,
        "shape": [2, 8],
        "dtype": "float32",
        "index_bits": 3,
        "zero_signs": True,
    }
    # a CRC-32 per stored tensor over its bytes as written above, the header's own CRC-32 beside it
    assert header["stored"] == {
        "w::nm.values": {
            "dtype": "float32",
            "shape": [6],
            "crc32": zlib.crc32(struct.pack("<6f", 1, -0.0, 2, -3, 4, 5)),
        },
        "w::nm.indices": {"dtype": "uint8", "shape": [3], "crc32": zlib.crc32(bytes([200, 196, 3]))},
        "w::nm.zero_signs": {"dtype": "uint8", "shape": [2], "crc32": zlib.crc32(bytes([4, 0]))},
    }
    with safe_open(str(path), framework="pt") as reader:
        metadata = reader.metadata()
    assert metadata["nmflow.crc32"] == str(zlib.crc32(metadata["nmflow"].encode()))


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(DTYPES),
    st.sampled_from([2, 4, 8, 16]),
    st.integers(1, 3),
    st.integers(1, 4),
    st.lists(st.sampled_from([0.0, -0.0, 1.0, -2.5, 7.0]), min_size=64, max_size=64),
)
def test_any_tensor_round_trips_bitwise(dtype, m, groups, rows, pool):
    weight = torch.tensor(pool * (rows * groups * m // 64 + 1))[: rows * groups * m].to(dtype).reshape(rows, -1)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "ckpt.safetensors")
        nmflow.save_compressed({"w": weight}, path, layouts={"w": 1})
        assert_bitwise_equal(nmflow.load_compressed(path), {"w": weight})


# ------------------------------------------------------------------ a finalized HF model
def test_finalized_gpt2_reloads_strictly_into_a_fresh_model_with_equal_outputs(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_inner=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(config).eval()
    recipe = nmflow.Recipe("ste", {"ff": "1:16"}, dense_steps=0)
    sp = nmflow.sparsify(model, recipe, total_steps=4, verbose=False)
    sp.finalize()
    path = tmp_path / "model.safetensors"

    chosen = round_trip(model, path)
    ff = {f"transformer.h.{i}.mlp.{leaf}.weight" for i in range(2) for leaf in ("c_fc", "c_proj")}
    assert {name: chosen[name] for name in ff} == dict.fromkeys(ff, "1:16")
    assert "transformer.h.0.attn.c_attn.weight" not in chosen  # dense weights are stored as is

    fresh = transformers.GPT2LMHeadModel(config).eval()
    fresh.load_state_dict(nmflow.load_compressed(path), strict=True)
    tokens = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        assert torch.equal(fresh(tokens).logits, model(tokens).logits)


# ------------------------------------------------------------------ sizes
def test_payload_size_matches_the_format_formula(tmp_path):
    model = nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32)).to(torch.bfloat16)
    with torch.no_grad():
        model[0].weight.copy_(sparse_weight((64, 128), 1, 16, 1, torch.bfloat16).abs())  # no -0.0: no sign blob
        model[2].weight.copy_(sparse_weight((32, 64), 2, 4, 1, torch.bfloat16))  # -0.0 entries: sign blob
    path = tmp_path / "ckpt.safetensors"
    assert nmflow.save_compressed(model, path) == {"0.weight": "1:16", "2.weight": "2:4"}

    kept_0, kept_2 = 64 * 128 // 16, 32 * 64 // 2
    expected = kept_0 * 2 + math.ceil(kept_0 * 4 / 8)  # values + 4-bit indices
    expected += kept_2 * 2 + math.ceil(kept_2 * 2 / 8) + math.ceil((32 * 64 - kept_2) / 8)  # + 1 sign bit per dropped
    expected += (64 + 32) * 2  # the biases, as is
    with open(path, "rb") as file:
        header_bytes = struct.unpack("<Q", file.read(8))[0]
    assert os.path.getsize(path) - 8 - header_bytes == expected


# ------------------------------------------------------------------ bad files
def small_checkpoint(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    nmflow.save_compressed({"w": sparse_weight((4, 32), 1, 8, 1, torch.float32)}, path, layouts={"w": 1})
    return path


def test_missing_file_is_named(tmp_path):
    with pytest.raises(nmflow.ConfigError, match="nowhere.safetensors"):
        nmflow.load_compressed(tmp_path / "nowhere.safetensors")


def test_garbage_and_truncated_files_are_named(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"definitely not a safetensors file" * 10)
    with pytest.raises(nmflow.ConfigError, match="garbage.safetensors"):
        nmflow.load_compressed(garbage)

    data = small_checkpoint(tmp_path).read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-5])
    with pytest.raises(nmflow.ConfigError, match="truncated.safetensors"):
        nmflow.load_compressed(truncated)


def doctored(tmp_path, edit_header, edit_tensors=lambda tensors: None):
    """A file edited on purpose, then checksummed again, so it reaches the checks behind the checksums."""
    tensors, header = stored(small_checkpoint(tmp_path))
    del header["stored"]
    edit_header(header)
    edit_tensors(tensors)
    path = tmp_path / "doctored.safetensors"
    write_compressed(path, tensors, header)
    return path


def test_other_format_versions_are_refused(tmp_path):
    path = doctored(tmp_path, lambda header: header.update(version=3))
    with pytest.raises(nmflow.ConfigError, match=r"doctored\.safetensors.*version 3"):
        nmflow.load_compressed(path)


def test_index_blob_of_the_wrong_length_is_refused(tmp_path):
    def shorten(tensors):
        tensors["w::nm.indices"] = tensors["w::nm.indices"][:-1].clone()

    path = doctored(tmp_path, lambda header: None, shorten)
    with pytest.raises(nmflow.ConfigError, match=r"doctored\.safetensors.*'w'.*index blob"):
        nmflow.load_compressed(path)


def test_header_naming_a_tensor_the_file_lacks_is_refused(tmp_path):
    path = doctored(tmp_path, lambda header: header["order"].append("ghost"))
    with pytest.raises(nmflow.ConfigError, match=r"doctored\.safetensors.*ghost"):
        nmflow.load_compressed(path)


def test_plain_safetensors_file_is_not_taken_for_a_checkpoint(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(nmflow.ConfigError, match=r"plain\.safetensors.*not an nmflow"):
        nmflow.load_compressed(path)


def test_unknown_layout_name_is_refused(tmp_path):
    with pytest.raises(nmflow.ConfigError, match="'nope'"):
        nmflow.save_compressed({"w": torch.ones(2, 4)}, tmp_path / "x.safetensors", layouts={"nope": 1})


# ------------------------------------------------------------------ atomic write
def test_a_failed_save_leaves_the_previous_file_and_no_leftovers(tmp_path, monkeypatch):
    path = small_checkpoint(tmp_path)
    before = path.read_bytes()

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as file:
            file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        nmflow.save_compressed({"w": torch.ones(4, 8)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]

    fresh = tmp_path / "fresh.safetensors"
    with pytest.raises(OSError, match="disk full"):
        nmflow.save_compressed({"w": torch.ones(4, 8)}, fresh)
    assert not fresh.exists()


# ------------------------------------------------------------------ checksums (damage: tests/test_damage.py)
def resigned(tmp_path, edit_metadata) -> os.PathLike:
    """The small checkpoint with its metadata edited, the header's own CRC-32 recomputed unless the edit removes it."""
    tensors, _ = stored(small_checkpoint(tmp_path))
    with safe_open(str(tmp_path / "ckpt.safetensors"), framework="pt") as reader:
        metadata = dict(reader.metadata())
    edit_metadata(metadata)
    if "nmflow.crc32" in metadata:
        metadata["nmflow.crc32"] = str(zlib.crc32(metadata["nmflow"].encode()))
    path = tmp_path / "edited.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def test_a_version_2_file_without_its_header_checksum_is_refused(tmp_path):
    path = resigned(tmp_path, lambda metadata: metadata.pop("nmflow.crc32"))
    with pytest.raises(nmflow.ConfigError, match=r"edited\.safetensors: a version 2 header without a checksum"):
        nmflow.load_compressed(path)


def test_a_stored_tensor_of_another_shape_than_recorded_is_refused(tmp_path):
    def reshape_record(metadata):
        header = json.loads(metadata["nmflow"])
        header["stored"]["w::nm.values"]["shape"] = [15]  # 4 x 32 at 1:8 keeps 16
        metadata["nmflow"] = json.dumps(header)

    with pytest.raises(nmflow.ConfigError, match=r"'w::nm\.values' is .*'shape': \[16\].*recorded .*'shape': \[15\]"):
        nmflow.load_compressed(resigned(tmp_path, reshape_record))


def test_read_compressed_returns_the_checked_header_and_the_raw_parts(tmp_path):
    path = small_checkpoint(tmp_path)
    header, parts = nmflow.compressed.read_compressed(path)
    raw, raw_header = stored(path)
    assert header == raw_header and set(parts) == set(raw) == {
        f"w::nm.{part}" for part in ("values", "indices", "zero_signs")
    }
    assert all(torch.equal(parts[key], raw[key]) for key in raw)


def test_the_new_file_is_synced_before_it_replaces_the_old_and_the_rename_after(tmp_path, monkeypatch):
    from nmflow import compressed

    events, real_sync, real_replace = [], compressed._sync, os.replace
    monkeypatch.setattr(compressed, "_sync", lambda path: events.append(("sync", path)) or real_sync(path))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", a)) or real_replace(a, b))
    path = small_checkpoint(tmp_path)
    temporary = events[0][1]
    assert events == [("sync", temporary), ("replace", temporary), ("sync", str(tmp_path))]
    assert os.path.dirname(temporary) == str(tmp_path) and not os.path.exists(temporary) and path.is_file()
