"""Image classification splits: scikit-learn's bundled digits, or the user's ``.npz`` file or image folder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F

from nmflow.app.data.splits import check_fractions
from nmflow.core.errors import ConfigError

__all__ = ["ImageSplits", "Split", "load_digits_splits", "load_image_splits"]

PIXEL_MAX = 16.0  # load_digits pixels are counts 0..16 (4x4 blocks of a 32x32 bitmap)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
VAL_FOLDERS = ("val", "valid")


@dataclass(frozen=True)
class Split:
    """Images [N, C, H, W] (float32, normalized) and their labels [N] (int64)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass(frozen=True)
class ImageSplits:
    """Train/validation/test images of one classification task, normalized with train statistics only."""

    train: Split
    val: Split
    test: Split
    class_names: tuple[str, ...]
    num_channels: int
    image_size: int
    source: str

    @property
    def num_labels(self) -> int:
        return len(self.class_names)


def load_digits_splits(data_seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15) -> ImageSplits:
    """Stratified train/validation/test split of the 1,797 digits, normalized with train statistics only."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / PIXEL_MAX  # [N, 1, 8, 8] in [0, 1]
    labels = torch.tensor(digits.target, dtype=torch.int64)
    everything = list(range(len(labels)))
    rest, test = train_test_split(everything, test_size=test_fraction, stratify=digits.target, random_state=data_seed)
    train, val = train_test_split(
        rest, test_size=val_fraction / (1 - test_fraction), stratify=digits.target[rest], random_state=data_seed
    )
    mean, std = images[train].mean(), images[train].std()

    def split(indices: list[int]) -> Split:
        return Split((images[indices] - mean) / std, labels[indices])

    return ImageSplits(
        split(train),
        split(val),
        split(test),
        class_names=tuple(str(d) for d in range(10)),
        num_channels=1,
        image_size=8,
        source="scikit-learn digits",
    )


def load_image_splits(
    path: str | Path,
    data_seed: int = 0,
    image_size: int | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> ImageSplits:
    """The user's own images: a ``.npz`` file or an image folder, as train/validation/test splits.

    The npz holds ``x``/``y`` (or ``images``/``labels``) or pre-split ``x_train``, ``y_train``, ``x_test``,
    ``y_test`` (optionally ``x_val``, ``y_val``), images [N, H, W], [N, H, W, C] or [N, C, H, W] with C 1 or 3,
    uint8 (0..255) or float (used as is), labels integer class ids. A folder is ``root/<class>/<images>`` or, with
    splits given, ``root/train/<class>/...`` plus ``root/test/`` and/or ``root/val/`` (or ``root/valid/``); its
    images become grayscale if all of them are, else RGB.

    Splits present in the data are used as given; missing ones are carved out of train, stratified and seeded by
    ``data_seed``: ``val_fraction`` and ``test_fraction`` are shares of the examples they are carved from, each
    class giving at least one example to every split. Images are resized to ``image_size`` x ``image_size``
    (bilinear) when given, else must all share one square size. Pixels are scaled to [0, 1], then normalized per
    channel with the mean and std of the train split only, so validation and test stay unseen.
    """
    path = Path(path)
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
    check_fractions(val_fraction, test_fraction)
    if not path.exists():
        raise ConfigError(f"image data {path} does not exist: give a .npz file or a folder of class subfolders")
    if path.is_dir():
        parts, class_names = _read_image_folder(path, image_size)
    elif path.suffix.lower() == ".npz":
        parts, class_names = _read_npz(path, image_size)
    else:
        raise ConfigError(
            f"unsupported image data {path}: file type {path.suffix or '(none)'!r}; "
            "give a .npz file or a folder of class subfolders"
        )
    return _assemble(parts, class_names, str(path), data_seed, val_fraction, test_fraction)


# ---- images: reading -------------------------------------------------------------------------------------------

# Each part (train, and val/test when the data gives them) is (images [N, C, H, W] uint8 or float32, labels [N]).
Parts = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_image_folder(root: Path, image_size: int | None) -> tuple[Parts, tuple[str, ...]]:
    """ImageNet style ``root/<class>/...`` or split style ``root/train/<class>/...``, as uint8 parts."""
    folders = {p.name: p for p in _subfolders(root)}
    split_names = {"train", "test", *VAL_FOLDERS}
    if folders.keys() & split_names:
        if "train" not in folders:
            raise ConfigError(f"image folder {root} has split folders but no train/ folder: add {root / 'train'}")
        others = sorted(folders.keys() - split_names)
        if others:
            raise ConfigError(
                f"image folder {root} mixes split folders (train, test, val) with other folders: {', '.join(others)}"
            )
        if all(name in folders for name in VAL_FOLDERS):
            raise ConfigError(f"image folder {root} has both val/ and valid/: keep one")
        split_roots = {"train": folders["train"]}
        for split, names in (("val", VAL_FOLDERS), ("test", ("test",))):
            split_roots.update((split, folders[name]) for name in names if name in folders)
    else:
        split_roots = {"train": root}

    class_names = tuple(p.name for p in _subfolders(split_roots["train"]))
    if not class_names:
        raise ConfigError(
            f"image folder {split_roots['train']} has no class subfolders: expect <folder>/<class>/<images>"
        )
    files: dict[str, list[tuple[Path, int]]] = {}
    for split, split_root in split_roots.items():
        classes = _subfolders(split_root)
        unknown = [p.name for p in classes if p.name not in class_names]
        if unknown:
            raise ConfigError(
                f"image folder {split_root} has classes missing from {split_roots['train']}: {', '.join(unknown)}"
            )
        if not classes:
            raise ConfigError(f"image folder {split_root} has no class subfolders: expect <folder>/<class>/<images>")
        files[split] = [(f, class_names.index(c.name)) for c in classes for f in _image_files(c)]

    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError("reading an image folder needs Pillow: pip install pillow") from error

    pixels = {split: [_read_image(f, image_size, Image) for f, _ in entries] for split, entries in files.items()}
    if image_size is None:
        sizes = {(a.shape[1], a.shape[0]) for arrays in pixels.values() for a in arrays}
        if len(sizes) > 1 or any(w != h for w, h in sizes):
            shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:5])
            raise ConfigError(
                f"images in {root} are not all one square size (found {shown}): pass image_size to resize them"
            )
    channels = 3 if any(a.ndim == 3 for arrays in pixels.values() for a in arrays) else 1
    parts = {}
    for split, arrays in pixels.items():
        stacked = np.stack([np.broadcast_to(a.reshape(*a.shape[:2], -1), (*a.shape[:2], channels)) for a in arrays])
        images = torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()  # grayscale replicated into RGB
        parts[split] = images, torch.tensor([label for _, label in files[split]], dtype=torch.int64)
    return parts, class_names


def _image_files(class_folder: Path) -> list[Path]:
    found = sorted(
        p
        for p in class_folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if not found:
        raise ConfigError(f"class folder {class_folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return found


def _read_image(file: Path, image_size: int | None, image_module: ModuleType) -> np.ndarray:
    """One image as uint8 [H, W] (grayscale) or [H, W, 3] (colour), resized when ``image_size`` is given."""
    try:
        with image_module.open(file) as image:
            image = image.convert("L" if image.mode in GRAYSCALE_MODES else "RGB")
            if image_size is not None and image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), image_module.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, image_module.DecompressionBombError) as error:
        raise ConfigError(f"cannot read image {file}: {error}") from error


def _read_npz(path: Path, image_size: int | None) -> tuple[Parts, tuple[str, ...]]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read {path} as a .npz archive: {error}") from error
    found = ", ".join(sorted(arrays)) or "(none)"
    if "x_train" in arrays or "y_train" in arrays:
        needed = ["x_train", "y_train", "x_test", "y_test"]
        if ("x_val" in arrays) != ("y_val" in arrays):
            needed += ["x_val", "y_val"]
        missing = [key for key in needed if key not in arrays]
        if missing:
            raise ConfigError(f"{path} lacks {', '.join(missing)} for a pre-split dataset; keys found: {found}")
        pairs = {split: (f"x_{split}", f"y_{split}") for split in ("train", "val", "test") if f"x_{split}" in arrays}
    else:
        pair = next(((x, y) for x, y in (("x", "y"), ("images", "labels")) if x in arrays and y in arrays), None)
        if pair is None:
            raise ConfigError(
                f"{path} needs arrays x and y, images and labels, or x_train, y_train, x_test, y_test "
                f"(optionally x_val, y_val); keys found: {found}"
            )
        pairs = {"train": pair}

    parts = {}
    for split, (x_key, y_key) in pairs.items():
        images = _npz_images(arrays[x_key], x_key, path, image_size)
        labels = arrays[y_key]
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ConfigError(
                f"{path}: {y_key} must be a 1-D array of integer class ids, got {labels.dtype} {labels.shape}"
            )
        if len(labels) != len(images):
            raise ConfigError(f"{path}: {x_key} holds {len(images)} images but {y_key} holds {len(labels)} labels")
        if not len(labels):
            raise ConfigError(f"{path}: {x_key} holds no images")
        if labels.min() < 0:
            raise ConfigError(f"{path}: {y_key} holds negative class ids; labels must be 0..K-1")
        parts[split] = images, torch.from_numpy(labels.astype(np.int64))
    shapes = {tuple(images.shape[1:]) for images, _ in parts.values()}
    if len(shapes) > 1:
        raise ConfigError(
            f"{path}: the splits' images differ in shape {sorted(shapes)}; pass image_size to resize them"
        )
    num_classes = max(int(labels.max()) + 1 for _, labels in parts.values())
    return parts, tuple(str(c) for c in range(num_classes))


def _npz_images(array: np.ndarray, key: str, path: Path, image_size: int | None) -> torch.Tensor:
    """``array`` as float32 [N, C, H, W] in [0, 1] (uint8 and integers) or as given (floats)."""
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[1] in (1, 3):
        pass  # [N, C, H, W]
    elif array.ndim == 4 and array.shape[3] in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    else:
        raise ConfigError(
            f"{path}: {key} has shape {array.shape}; expected [N, H, W], [N, H, W, C] or [N, C, H, W] with C 1 or 3"
        )
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ConfigError(f"{path}: integer pixels of {key} must lie in 0..255")
        images = torch.from_numpy(array.astype(np.float32)) / 255.0
    elif np.issubdtype(array.dtype, np.floating):
        images = torch.from_numpy(array.astype(np.float32))
        if not torch.isfinite(images).all():
            raise ConfigError(f"{path}: {key} holds NaN or infinite pixels")
    else:
        raise ConfigError(f"{path}: {key} has dtype {array.dtype}; expected uint8 or float pixels")
    height, width = images.shape[2:]
    if image_size is not None:
        if (height, width) != (image_size, image_size):
            images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True)
    elif height != width:
        raise ConfigError(f"{path}: images of {key} are {width}x{height}, not square: pass image_size to resize them")
    return images


# ---- images: splitting and normalizing -------------------------------------------------------------------------


def _stratified_split(
    labels: torch.Tensor, fractions: Sequence[float], names: Sequence[str], data_seed: int, where: str
) -> list[torch.Tensor]:
    """Sorted index tensors: one per fraction (per class, its share rounded, at least 1), then the rest."""
    generator = torch.Generator().manual_seed(data_seed)
    pieces: list[list[torch.Tensor]] = [[] for _ in range(len(fractions) + 1)]
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        counts = [max(1, round(f * len(members))) for f in fractions]
        if sum(counts) >= len(members):
            raise ConfigError(
                f"{where}: class {label} has {len(members)} example(s), too few to split off {', '.join(names)} "
                f"(fractions {', '.join(map(str, fractions))}) and keep one for training; "
                "each class needs at least one example in each split"
            )
        bounds = np.cumsum([0, *counts]).tolist()
        for piece, start, stop in zip(pieces, bounds, bounds[1:]):
            piece.append(members[start:stop])
        pieces[-1].append(members[bounds[-1] :])
    return [torch.cat(piece).sort().values for piece in pieces]


def _assemble(
    parts: Parts,
    class_names: tuple[str, ...],
    source: str,
    data_seed: int,
    val_fraction: float,
    test_fraction: float,
) -> ImageSplits:
    """Carve the missing splits out of train, then normalize all splits with train's per-channel statistics."""
    images, labels = parts["train"]
    missing = [(name, f) for name, f in (("val", val_fraction), ("test", test_fraction)) if name not in parts]
    if missing:
        names, fractions = zip(*missing)
        *carved, kept = _stratified_split(labels, fractions, names, data_seed, source)
        parts = dict(parts)
        for name, indices in zip(names, carved):
            parts[name] = images[indices], labels[indices]
        parts["train"] = images[kept], labels[kept]

    def scaled(images: torch.Tensor) -> torch.Tensor:
        return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()

    train_images = scaled(parts["train"][0])
    mean = train_images.mean(dim=(0, 2, 3), keepdim=True)
    std = train_images.std(dim=(0, 2, 3), keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant channel carries no signal: only centre it

    def split(name: str) -> Split:
        images, labels = parts[name]
        pixels = train_images if name == "train" else scaled(images)
        return Split((pixels - mean) / std, labels)

    return ImageSplits(
        split("train"),
        split("val"),
        split("test"),
        class_names=class_names,
        num_channels=train_images.shape[1],
        image_size=train_images.shape[2],
        source=source,
    )
