"""The data of `nmflow train`: image classification splits and byte-level text splits, all held in memory.

Images come from scikit-learn's bundled 8x8 digits (no download) or from the user's own ``.npz`` file or image
folder; text comes from CPython's bundled documentation topics or the user's own text files. Every split depends
only on ``data_seed``, so runs with different training seeds see the same train/validation/test data and differ
only in their training.
"""

from nmflow.app.data.images import ImageSplits, Split, load_digits_splits, load_image_splits
from nmflow.app.data.splits import batch_indices
from nmflow.app.data.text import TextSplits, load_text_splits, random_windows, text_windows

__all__ = [
    "ImageSplits",
    "Split",
    "TextSplits",
    "batch_indices",
    "load_digits_splits",
    "load_image_splits",
    "load_text_splits",
    "random_windows",
    "text_windows",
]
