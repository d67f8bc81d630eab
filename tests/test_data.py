"""The data loaders: image folders, npz files, digits and text, checked against the files they were built from."""

import math
import string
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from nmflow.app.data import (
    ImageSplits,
    load_digits_splits,
    load_image_splits,
    load_text_splits,
    random_windows,
    text_windows,
)
from nmflow.core.errors import ConfigError

# ---- helpers ---------------------------------------------------------------------------------------------------


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def class_folder(root: Path, counts: dict[str, int], rgb: bool = False, size: int = 6, seed: int = 0) -> dict:
    """Random PNGs under ``root/<class>/``; returns {file: (class name, pixels uint8 [H, W] or [H, W, 3])}."""
    rng = np.random.default_rng(seed)
    made = {}
    for name, count in counts.items():
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size, 3) if rgb else (size, size), dtype=np.uint8)
            file = root / name / f"img{i:02d}.png"
            write_png(file, pixels)
            made[file] = (name, pixels)
    return made


def as_chw(pixels: np.ndarray, channels: int) -> np.ndarray:
    """Expected [C, H, W] in [0, 1] of a file's uint8 pixels in a dataset of ``channels`` channels."""
    chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return np.repeat(chw, channels // chw.shape[0], axis=0).astype(np.float64) / 255


def recover(data: ImageSplits, raw: list[np.ndarray]) -> dict[str, list[int]]:
    """Which raw image ([C, H, W] in [0, 1]) each example of each split is, undoing the one per-channel affine map.

    The map is fitted on the sorted pooled pixels of all splits against those of ``raw``, so it is found without
    trusting the loader's statistics; every example must then match exactly one raw image.
    """
    splits = {name: getattr(data, name) for name in ("train", "val", "test")}
    pooled = torch.cat([s.images for s in splits.values()]).double()
    expected = np.stack(raw)
    assert pooled.shape == expected.shape
    scale, offset = [], []
    for c in range(pooled.shape[1]):
        got = np.sort(pooled[:, c].numpy().ravel())
        want = np.sort(expected[:, c].ravel())
        slope, intercept = np.polyfit(got, want, 1)
        np.testing.assert_allclose(got * slope + intercept, want, atol=1e-5)
        scale.append(slope)
        offset.append(intercept)
    scale, offset = np.array(scale)[:, None, None], np.array(offset)[:, None, None]
    found = {}
    for name, split in splits.items():
        found[name] = []
        for image in split.images.double().numpy():
            distance = np.abs(expected - (image * scale + offset)).max(axis=(1, 2, 3))
            assert np.sum(distance < 1e-4) == 1, "every example is exactly one of the raw images"
            found[name].append(int(np.argmin(distance)))
    train = expected[found["train"]]
    np.testing.assert_allclose(offset.ravel(), train.mean(axis=(0, 2, 3)), atol=1e-5)  # train statistics only
    np.testing.assert_allclose(scale.ravel(), train.std(axis=(0, 2, 3), ddof=1), atol=1e-5)
    return found


def assert_partition(found: dict[str, list[int]], total: int) -> None:
    assert sorted(i for indices in found.values() for i in indices) == list(range(total))


# ---- image folders ---------------------------------------------------------------------------------------------


def test_imagenet_style_folder_gives_stratified_disjoint_splits(tmp_path):
    made = class_folder(tmp_path, {"cat": 7, "ant": 6, "bee": 8})
    data = load_image_splits(tmp_path)
    assert data.class_names == ("ant", "bee", "cat")
    assert (data.num_labels, data.num_channels, data.image_size) == (3, 1, 6)
    assert data.source == str(tmp_path)
    assert data.train.images.shape[1:] == (1, 6, 6) and data.train.images.dtype == torch.float32
    files = list(made)
    found = recover(data, [as_chw(made[f][1], 1) for f in files])
    assert_partition(found, len(files))
    for name in ("train", "val", "test"):
        split = getattr(data, name)
        assert split.labels.dtype == torch.int64
        classes = [data.class_names[int(label)] for label in split.labels]
        assert classes == [made[files[i]][0] for i in found[name]]
        assert set(classes) == {"ant", "bee", "cat"}, f"{name} holds every class"


def test_split_depends_only_on_data_seed(tmp_path):
    class_folder(tmp_path, {"a": 10, "b": 10})
    first, again, other = (load_image_splits(tmp_path, data_seed=s) for s in (0, 0, 1))
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(first, name).images, getattr(again, name).images)
        assert torch.equal(getattr(first, name).labels, getattr(again, name).labels)
    assert not torch.equal(first.val.images, other.val.images)


def test_fractions_set_the_split_sizes_per_class(tmp_path):
    class_folder(tmp_path, {"a": 20, "b": 10})
    data = load_image_splits(tmp_path, val_fraction=0.1, test_fraction=0.3)
    for name, share in (("val", 0.1), ("test", 0.3)):
        counts = torch.bincount(getattr(data, name).labels, minlength=2).tolist()
        assert counts == [round(share * 20), round(share * 10)]
    assert len(data.train) == 30 - len(data.val) - len(data.test)


def test_grayscale_and_colour_images_become_rgb(tmp_path):
    made = class_folder(tmp_path, {"gray": 4}, seed=1) | class_folder(tmp_path, {"rgb": 4}, rgb=True, seed=2)
    data = load_image_splits(tmp_path)
    assert data.num_channels == 3 and data.train.images.shape[1:] == (3, 6, 6)
    found = recover(data, [as_chw(pixels, 3) for _, pixels in made.values()])
    assert_partition(found, len(made))


def test_cifar_style_folder_uses_the_given_splits(tmp_path):
    made = {
        split: class_folder(tmp_path / folder, {"x": 3, "y": 3}, rgb=True, seed=seed)
        for split, folder, seed in (("train", "train", 0), ("val", "valid", 1), ("test", "test", 2))
    }
    for file, (_, pixels) in made["test"].items():
        pixels //= 2  # darker test images: statistics from all splits would differ from train's
        write_png(file, pixels)
    data = load_image_splits(tmp_path)
    assert data.class_names == ("x", "y")
    train = np.stack([as_chw(p, 3) for _, p in made["train"].values()])
    mean = train.mean(axis=(0, 2, 3))[None, :, None, None]
    std = train.std(axis=(0, 2, 3), ddof=1)[None, :, None, None]
    for name, files in made.items():
        split = getattr(data, name)
        expected = (np.stack([as_chw(p, 3) for _, p in files.values()]) - mean) / std
        np.testing.assert_allclose(split.images.numpy(), expected, atol=1e-5)  # folder order: class, then file
        assert [data.class_names[int(i)] for i in split.labels] == [c for c, _ in files.values()]


def test_cifar_style_folder_carves_missing_val_out_of_train(tmp_path):
    train = class_folder(tmp_path / "train", {"x": 8, "y": 8})
    test = class_folder(tmp_path / "test", {"x": 2, "y": 2}, seed=5)
    data = load_image_splits(tmp_path, val_fraction=0.25)
    raw = [as_chw(p, 1) for _, p in [*train.values(), *test.values()]]
    found = recover(data, raw)
    assert_partition(found, len(raw))
    assert sorted(found["test"]) == list(range(16, 20))
    assert torch.bincount(data.val.labels).tolist() == [2, 2]


def test_image_size_resizes_bilinear(tmp_path):
    made = class_folder(tmp_path, {"a": 3}, size=6) | class_folder(tmp_path, {"b": 3}, size=9, seed=3)
    write_png(tmp_path / "b" / "wide.png", np.full((5, 8), 200, dtype=np.uint8))
    with pytest.raises(ConfigError, match="image_size"):
        load_image_splits(tmp_path)
    data = load_image_splits(tmp_path, image_size=4)
    assert data.image_size == 4 and data.train.images.shape[1:] == (1, 4, 4)
    resized = [np.asarray(Image.fromarray(p).resize((4, 4), Image.Resampling.BILINEAR)) for _, p in made.values()]
    found = recover(data, [as_chw(p, 1) for p in [*resized, np.full((4, 4), 200, dtype=np.uint8)]])
    assert_partition(found, len(made) + 1)


# ---- npz -------------------------------------------------------------------------------------------------------


def npz_images(layout: str, count: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Images in ``layout`` and the expected [C, H, W] in [0, 1] of each."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (count, 5, 5, 3), dtype=np.uint8)
    if layout == "nhw":
        array, chw = pixels[..., 0], pixels[..., :1].transpose(0, 3, 1, 2)
    elif layout == "nhw1":
        array, chw = pixels[..., :1], pixels[..., :1].transpose(0, 3, 1, 2)
    elif layout == "nhwc":
        array, chw = pixels, pixels.transpose(0, 3, 1, 2)
    else:  # nchw float in [0, 1]
        chw = pixels.transpose(0, 3, 1, 2)
        return chw.astype(np.float32) / 255, list(chw / 255)
    return array, list(chw / 255)


@pytest.mark.parametrize("layout", ["nhw", "nhw1", "nhwc", "nchw-float"])
@pytest.mark.parametrize("keys", [("x", "y"), ("images", "labels")])
def test_npz_layouts(tmp_path, layout, keys):
    array, raw = npz_images(layout, 18)
    labels = np.arange(18) % 3
    np.savez(tmp_path / "d.npz", **{keys[0]: array, keys[1]: labels})
    data = load_image_splits(tmp_path / "d.npz")
    assert data.class_names == ("0", "1", "2") and data.image_size == 5
    assert data.num_channels == raw[0].shape[0]
    found = recover(data, raw)
    assert_partition(found, 18)
    for name, indices in found.items():
        assert getattr(data, name).labels.tolist() == labels[indices].tolist()


@pytest.mark.parametrize("with_val", [False, True])
def test_npz_pre_split(tmp_path, with_val):
    train, raw_train = npz_images("nhwc", 12, seed=1)
    test, raw_test = npz_images("nhwc", 4, seed=2)
    val, raw_val = npz_images("nhwc", 3, seed=3)
    arrays = dict(x_train=train, y_train=np.arange(12) % 2, x_test=test, y_test=np.array([0, 1, 4, 1]))
    if with_val:
        arrays |= dict(x_val=val, y_val=np.array([1, 0, 1]))
    np.savez(tmp_path / "d.npz", **arrays)
    data = load_image_splits(tmp_path / "d.npz", val_fraction=0.25)
    assert data.class_names == ("0", "1", "2", "3", "4")
    raw = raw_train + raw_test + (raw_val if with_val else [])
    found = recover(data, raw)
    assert_partition(found, len(raw))
    assert found["test"] == list(range(12, 16))
    assert data.test.labels.tolist() == [0, 1, 4, 1]
    if with_val:
        assert found["val"] == list(range(16, 19)) and len(data.train) == 12
    else:
        assert torch.bincount(data.val.labels).tolist() == [round(0.25 * 6)] * 2


def test_npz_resize(tmp_path):
    levels = [10, 50, 90, 130, 170, 210]
    images = np.stack([np.full((8, 8), v, dtype=np.uint8) for v in levels])
    np.savez(tmp_path / "d.npz", x=images, y=np.arange(6) % 2)
    data = load_image_splits(tmp_path / "d.npz", image_size=3, val_fraction=0.2, test_fraction=0.2)
    assert data.train.images.shape == (2, 1, 3, 3)
    assert_partition(recover(data, [np.full((1, 3, 3), v / 255) for v in levels]), 6)  # flat images stay flat


# ---- errors ----------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.*does not exist"):
        load_image_splits(tmp_path / "nowhere")


def test_unsupported_file_type(tmp_path):
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(ConfigError, match=r"unsupported.*data\.csv.*'\.csv'"):
        load_image_splits(tmp_path / "data.csv")


def test_folder_without_class_subfolders(tmp_path):
    write_png(tmp_path / "loose.png", np.zeros((6, 6), dtype=np.uint8))
    with pytest.raises(ConfigError, match="no class subfolders"):
        load_image_splits(tmp_path)


def test_class_folder_without_images(tmp_path):
    class_folder(tmp_path, {"a": 3})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(ConfigError, match=f"class folder {tmp_path / 'b'} holds no images"):
        load_image_splits(tmp_path)


def test_unreadable_image_is_named(tmp_path):
    class_folder(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ConfigError, match="cannot read image .*broken.png"):
        load_image_splits(tmp_path)


def test_too_few_examples_per_class(tmp_path):
    class_folder(tmp_path, {"a": 5, "b": 2})
    with pytest.raises(ConfigError, match="class 1 has 2 example.*at least one example in each split"):
        load_image_splits(tmp_path)


def test_split_folders_need_train_and_known_classes(tmp_path):
    class_folder(tmp_path / "test", {"a": 2})
    with pytest.raises(ConfigError, match="no train/ folder"):
        load_image_splits(tmp_path)
    class_folder(tmp_path / "train", {"a": 4})
    class_folder(tmp_path / "val", {"z": 2})
    with pytest.raises(ConfigError, match="classes missing from .*train: z"):
        load_image_splits(tmp_path)


@pytest.mark.parametrize(
    "arrays,message",
    [
        (dict(a=np.zeros(2), b=np.zeros(2)), "keys found: a, b"),
        (dict(x_train=np.zeros((4, 5, 5)), y_train=np.zeros(4, int), x_test=np.zeros((2, 5, 5))), "lacks y_test"),
        (dict(x=np.zeros((4, 5, 5)), y=np.zeros(3, int)), "x holds 4 images but y holds 3 labels"),
        (dict(x=np.zeros((4, 5, 5)), y=np.zeros(4)), "integer class ids"),
        (dict(x=np.zeros((4, 2, 5, 5)), y=np.zeros(4, int)), r"shape \(4, 2, 5, 5\)"),
        (dict(x=np.zeros((4, 5, 6)), y=np.zeros(4, int)), "not square: pass image_size"),
        (dict(x=np.zeros((4, 5, 5), np.uint8), y=np.array([0, 0, 1, 1])), "class 0 has 2 example"),
    ],
)
def test_bad_npz(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ConfigError, match=message) as caught:
        load_image_splits(path)
    assert str(path) in str(caught.value)


# ---- digits ----------------------------------------------------------------------------------------------------


def test_digits_splits():
    data = load_digits_splits(data_seed=0)
    assert data.class_names == tuple("0123456789") and data.num_labels == 10
    assert (data.num_channels, data.image_size, data.source) == (1, 8, "scikit-learn digits")
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    assert data.train.images.shape[1:] == (1, 8, 8)
    assert abs(data.train.images.mean().item()) < 1e-5 and data.train.images.std().item() == pytest.approx(1)


# ---- text ------------------------------------------------------------------------------------------------------


def random_text(size: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return "".join(rng.choice(list(string.ascii_letters + " \n"), size))


def chunk_ids(split: torch.Tensor, chunks: list[bytes]) -> list[int]:
    """Which chunks, in order, ``split`` is the concatenation of (chunks of random text do not repeat)."""
    data, position, ids = split.numpy().tobytes(), 0, []
    for i, chunk in enumerate(chunks):
        if data[position : position + len(chunk)] == chunk:
            ids.append(i)
            position += len(chunk)
    assert position == len(data), "the split is whole chunks in their original order"
    return ids


def test_text_splits_are_chunks_in_original_order(tmp_path):
    text = random_text(1000)
    (tmp_path / "t.txt").write_text(text)
    data = load_text_splits(tmp_path / "t.txt", chunk_bytes=32, val_fraction=0.2, test_fraction=0.1)
    assert data.vocab_size == 256 and data.source == str(tmp_path / "t.txt")
    assert data.train.dtype == torch.uint8 and data.train.ndim == 1
    chunks = [text.encode()[i : i + 32] for i in range(0, 1000, 32)]
    ids = {name: chunk_ids(getattr(data, name), chunks) for name in ("train", "val", "test")}
    assert sorted(i for part in ids.values() for i in part) == list(range(len(chunks)))
    assert (len(ids["val"]), len(ids["test"])) == (round(0.2 * 32), round(0.1 * 32))


def test_text_split_depends_only_on_data_seed(tmp_path):
    (tmp_path / "t.txt").write_text(random_text(3000))
    first, again, other = (load_text_splits(tmp_path / "t.txt", data_seed=s, chunk_bytes=64) for s in (0, 0, 1))
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert not torch.equal(first.val, other.val)


def test_text_folder_joins_text_files_sorted(tmp_path):
    texts = {"a.txt": random_text(300, 1), "c.rst": "é " + random_text(300, 2), "sub/b.md": random_text(300, 3)}
    for name, text in texts.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "skip.py").write_text("print('not text data')")
    data = load_text_splits(tmp_path, chunk_bytes=50)
    corpus = "\n\n".join(texts[k] for k in ("a.txt", "c.rst", "sub/b.md")).encode()
    chunks = [corpus[i : i + 50] for i in range(0, len(corpus), 50)]
    ids = sorted(i for s in (data.train, data.val, data.test) for i in chunk_ids(s, chunks))
    assert ids == list(range(len(chunks)))


def test_default_text_is_pythons_documentation():
    from pydoc_data.topics import topics

    corpus = "\n\n".join(topics[k] for k in sorted(topics)).encode()
    data = load_text_splits()
    assert len(corpus) > 100_000 and "pydoc" in data.source
    chunks = [corpus[i : i + 2048] for i in range(0, len(corpus), 2048)]
    ids = {name: chunk_ids(getattr(data, name), chunks) for name in ("train", "val", "test")}
    assert sorted(i for part in ids.values() for i in part) == list(range(len(chunks)))
    assert len(ids["val"]) == len(ids["test"]) == round(0.1 * len(chunks))


def test_text_errors(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.*does not exist"):
        load_text_splits(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "code.py").write_text("x = 1")
    with pytest.raises(ConfigError, match="empty holds no text files"):
        load_text_splits(tmp_path / "empty")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ConfigError, match=r"bad\.txt is not valid UTF-8"):
        load_text_splits(tmp_path)
    (tmp_path / "short.txt").write_text("x" * 32)
    with pytest.raises(ConfigError, match="32 bytes.*at least 33 bytes"):
        load_text_splits(tmp_path / "short.txt", chunk_bytes=16)
    (tmp_path / "short.txt").write_text("x" * 33)
    assert len(load_text_splits(tmp_path / "short.txt", chunk_bytes=16).test) in (16, 1)


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(0, 3000),
    chunk=st.integers(1, 300),
    val=st.floats(0.01, 0.6),
    test=st.floats(0.01, 0.6),
)
def test_text_chunk_split_partitions_all_chunks(size, chunk, val, test):
    assume(val + test < 1)
    chunks = math.ceil(size / chunk)
    num_val, num_test = max(1, round(val * chunks)), max(1, round(test * chunks))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "t.txt"
        path.write_text("x" * size)
        if chunks < 3 or num_val + num_test >= chunks:
            with pytest.raises(ConfigError, match="too short|leave none for training"):
                load_text_splits(path, chunk_bytes=chunk, val_fraction=val, test_fraction=test)
            return
        data = load_text_splits(path, chunk_bytes=chunk, val_fraction=val, test_fraction=test)
    assert len(data.train) + len(data.val) + len(data.test) == size
    # the last chunk may be short: a split holds its chunk count in full chunks, or one fewer plus the tail
    tail = size - (chunks - 1) * chunk
    for split, count in ((data.val, num_val), (data.test, num_test), (data.train, chunks - num_val - num_test)):
        assert len(split) in (count * chunk, (count - 1) * chunk + tail)


def test_text_windows_cover_the_split():
    data = (torch.arange(23) * 7 % 256).to(torch.uint8)
    windows = text_windows(data, 5)
    assert windows.shape == (4, 6) and windows.dtype == torch.int64
    for k in range(4):
        assert windows[k].tolist() == data[5 * k : 5 * k + 6].tolist()
    assert windows[:, 1:].flatten().tolist() == data[1:21].tolist()  # each byte a target once, tail dropped
    assert text_windows(data[:6], 5).shape == (1, 6)
    with pytest.raises(ConfigError, match="5 bytes is too short.*6"):
        text_windows(data[:5], 5)


def test_random_windows_replay_with_the_generator():
    data = torch.arange(40, dtype=torch.uint8)
    batch = random_windows(data, 6, 500, torch.Generator().manual_seed(3))
    assert batch.shape == (500, 7) and batch.dtype == torch.int64
    assert torch.equal(batch - batch[:, :1], torch.arange(7).expand(500, 7))  # consecutive bytes of the split
    assert set(batch[:, 0].tolist()) == set(range(40 - 6))  # every start, up to the last full window
    generator = torch.Generator().manual_seed(3)
    assert torch.equal(random_windows(data, 6, 500, generator), batch)
    assert not torch.equal(random_windows(data, 6, 500, generator), batch)
    with pytest.raises(ConfigError, match="too short"):
        random_windows(data[:6], 6, 1, generator)
