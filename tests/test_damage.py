"""Damaged compressed checkpoints: every single-bit flip is refused naming the file, or loads the same weights.

Each bit of a small checkpoint is flipped in turn and the file loaded. Every flip is sorted into the part of
the file it hits, found from the safetensors layout read here (not by nmflow): the 8-byte header length, the
JSON header, kept values, packed indices, the padding bits of the packed blobs, dropped-zero signs, a tensor
stored dense. Version 1 of the format (no checksums) fails these tests: a flipped value or index bit there is
a valid file holding other weights.
"""

from __future__ import annotations

import json
import struct
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nmflow

STATE_LAYOUTS = {"w": 1, "v": 1}


def checkpoint_state() -> dict[str, torch.Tensor]:
    """A 3:8 fp32 tensor with dropped -0.0 entries (a sign blob), a 1:16 fp16 one, a dense bias."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 16, generator=gen)
    w = w * nmflow.nm_mask(w, 3, 8, dim=1)
    w[w == 0] = torch.where(torch.arange(int((w == 0).sum())) % 3 == 0, -0.0, 0.0)
    v = torch.randn(3, 16, generator=gen).half()
    v = v * nmflow.nm_mask(v, 1, 16, dim=1)
    return {"w": w, "v": v, "bias": torch.randn(3, generator=gen)}


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype
        and a[k].shape == b[k].shape
        and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))
        for k in b
    )


def bit_classes(data: bytes) -> list[str]:
    """The part of the file each bit belongs to, from the safetensors layout: length, JSON, then per tensor."""
    header_length = struct.unpack("<Q", data[:8])[0]
    classes = ["header length"] * 64 + ["JSON header"] * (header_length * 8)
    layout = json.loads(data[8 : 8 + header_length])
    nmflow_header = json.loads(layout.pop("__metadata__")["nmflow"])
    for key, entry in sorted(layout.items(), key=lambda item: item[1]["data_offsets"]):
        begin, end = entry["data_offsets"]
        assert len(classes) == (8 + header_length + begin) * 8  # the tensors tile the data section
        name, _, part = key.partition("::nm.")
        info = nmflow_header["tensors"].get(name)
        if info is None:
            classes += ["dense tensor"] * ((end - begin) * 8)
            continue
        numel, kept = info["shape"][0] * info["shape"][1], info["shape"][0] * info["shape"][1] // info["m"] * info["n"]
        used = {"values": (end - begin) * 8, "indices": kept * info["index_bits"], "zero_signs": numel - kept}[part]
        label = {"values": "values", "indices": "packed indices", "zero_signs": "zero signs"}[part]
        classes += [label] * used + [f"{label} padding"] * ((end - begin) * 8 - used)
    assert len(classes) == len(data) * 8
    return classes


def load_outcome(path: Path, original: dict[str, torch.Tensor]) -> str:
    """'refused' (a ConfigError naming the file), 'same' (bitwise the original), or 'DIFFERENT'."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a damaged file may not pass as an unchecked version-1 file
            loaded = nmflow.load_compressed(path)
    except nmflow.ConfigError as err:
        assert str(path) in str(err)
        return "refused"
    return "same" if same_bits(loaded, original) else "DIFFERENT"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[bytes, dict[str, torch.Tensor]]:
    state = checkpoint_state()
    path = tmp_path_factory.mktemp("compressed") / "ckpt.safetensors"
    assert nmflow.save_compressed(state, path, layouts=STATE_LAYOUTS) == {"w": "3:8", "v": "1:16"}
    return path.read_bytes(), state


def test_every_single_bit_flip_is_refused_naming_the_file(saved, tmp_path):
    data, state = saved
    classes = bit_classes(data)
    expected_classes = {"header length", "JSON header", "values", "packed indices", "packed indices padding"}
    expected_classes |= {"zero signs", "zero signs padding", "dense tensor"}
    assert set(classes) == expected_classes  # the file has every part the format can have
    damaged = tmp_path / "damaged.safetensors"
    outcomes = Counter()
    for bit, part in enumerate(classes):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        damaged.write_bytes(flipped)
        outcomes[part, load_outcome(damaged, state)] += 1
    assert {outcome for _, outcome in outcomes} <= {"refused", "same"}, outcomes
    # bits of stored tensors are all covered by their checksums: no flip there may pass, even one that could
    assert all(outcome == "refused" for part, outcome in outcomes if part != "JSON header"), outcomes


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    st.sampled_from([(1, 4), (2, 4), (1, 8), (3, 8), (1, 16), (5, 32)]),
    st.integers(1, 5),
    st.booleans(),
    st.data(),
)
def test_a_flipped_bit_in_any_compressed_tensor_is_refused(tmp_path_factory, dtype, pattern, rows, negative, data):
    n, m = pattern
    weight = torch.randn(rows, 2 * m).to(dtype)
    mask = nmflow.nm_mask(weight, n, m, dim=1)
    weight = weight * mask if negative else weight.masked_fill(~mask, 0.0)  # w * mask keeps -0.0: a sign blob
    path = tmp_path_factory.mktemp("flip") / "ckpt.safetensors"
    nmflow.save_compressed({"w": weight}, path, layouts={"w": 1})
    original = path.read_bytes()
    classes = bit_classes(original)
    stored_bits = [bit for bit, part in enumerate(classes) if part not in ("header length", "JSON header")]
    bit = data.draw(st.sampled_from(stored_bits))
    path.write_bytes(original[: bit // 8] + bytes([original[bit // 8] ^ (1 << (bit % 8))]) + original[bit // 8 + 1 :])
    assert load_outcome(path, {"w": weight}) == "refused", classes[bit]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_overwritten_truncated_or_extended_files_are_refused_or_identical(saved, tmp_path_factory, data):
    original, state = saved
    damage = data.draw(st.sampled_from(["overwrite", "truncate", "extend"]))
    if damage == "overwrite":
        start = data.draw(st.integers(0, len(original) - 1))
        junk = data.draw(st.binary(min_size=1, max_size=64))
        damaged = original[:start] + junk + original[start + len(junk) :]
        damaged = damaged[: len(original)]
    elif damage == "truncate":
        damaged = original[: data.draw(st.integers(0, len(original) - 1))]
    else:
        damaged = original + data.draw(st.binary(min_size=1, max_size=64))
    path = tmp_path_factory.mktemp("damaged") / "ckpt.safetensors"
    path.write_bytes(damaged)
    outcome = load_outcome(path, state)
    assert outcome == "refused" or (outcome == "same" and damaged == original[: len(damaged)]), (damage, outcome)


def test_a_version_1_file_loads_identical_weights_with_a_warning_that_it_is_unchecked(saved, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    data, state = saved
    (tmp_path / "v2.safetensors").write_bytes(data)
    with safe_open(str(tmp_path / "v2.safetensors"), framework="pt") as reader:
        tensors = {key: reader.get_tensor(key) for key in reader.keys()}  # noqa: SIM118
        header = json.loads(reader.metadata()["nmflow"])
    del header["stored"]
    path = tmp_path / "old.safetensors"
    save_file(tensors, str(path), metadata={"nmflow": json.dumps({**header, "version": 1})})  # as nmflow 0.2 wrote
    with pytest.warns(UserWarning, match=r"old\.safetensors.*version 1.*no checksums.*unchecked"):
        loaded = nmflow.load_compressed(path)
    assert same_bits(loaded, state)


@pytest.mark.parametrize("key", ["w::nm.values", "w::nm.indices", "w::nm.zero_signs", "v::nm.indices", "bias"])
def test_the_message_names_the_damaged_tensor(saved, tmp_path, key):
    data, _ = saved
    header_length = struct.unpack("<Q", data[:8])[0]
    begin, end = json.loads(data[8 : 8 + header_length])[key]["data_offsets"]
    damaged = bytearray(data)
    damaged[8 + header_length + end - 1] ^= 0x80  # the last byte's top bit: padding, for the packed blobs
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(damaged)
    with pytest.raises(nmflow.ConfigError, match=rf"damaged\.safetensors: stored tensor '{key}' is corrupted"):
        nmflow.load_compressed(path)
