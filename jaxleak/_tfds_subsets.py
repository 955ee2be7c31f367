"""Write an ``.npz`` subset into a tfds ``data_dir`` under the dataset's real tfds name.

These machines reach no dataset host, so ``tfds`` cannot download anything. This module turns
one of the shared subsets (``images`` uint8 NHWC, ``labels`` int, ``class_names``) into a
prepared tfds dataset: a generator-based builder that borrows the *stock* builder's name,
version and features, and writes ``array_record`` shards without TensorFlow (images are
PNG-encoded with PIL, which is lossless). The stock ``tfds.data_source(name, data_dir=...)``
then reads the examples back in the original order (shuffling is disabled when writing).

Limits, stated honestly: the subsets are not the official splits (see ``shared/data/README.md``),
and a subset may be stored at a smaller size than the stock feature declares (``lfw`` is 32x32
here, 250x250 in tfds); the metadata keeps the stock declaration, the pixels are the subset's.
"""

from __future__ import annotations

import io
import pathlib
import warnings
from typing import Iterator, Optional

import numpy as np

# The split a subset is written to when none is given: the split the experiments read.
DEFAULT_SPLIT = {
    "mnist": "test",
    "cifar10": "test",
    "cifar100": "test",
    "lfw": "train",  # the only split tfds `lfw` has
    "imagenet2012": "validation",
    "oxford_flowers102": "test",
}


def _png(image: np.ndarray) -> bytes:
    """PNG bytes of one uint8 ``(H, W, C)`` image, ``C`` in {1, 3, 4}."""
    from PIL import Image

    array = image[..., 0] if image.shape[-1] == 1 else image
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _example(
    features, i: int, arrays: dict, class_names: tuple[str, ...], name: str, split: str
) -> dict:
    """The tfds example ``i`` for the stock ``features``, filled from the subset's ``arrays``."""
    import tensorflow_datasets as tfds

    example = {}
    for key, feature in features.items():
        if key == "image":
            example[key] = _png(arrays["images"][i])
        elif key == "label" and isinstance(feature, tfds.features.ClassLabel):
            example[key] = int(arrays["labels"][i])
        elif key == "label" and isinstance(feature, tfds.features.Text):
            example[key] = class_names[int(arrays["labels"][i])]
        elif key == "coarse_label":
            if "coarse_labels" not in arrays:
                raise ValueError(f"npz for {name!r} needs a 'coarse_labels' array for tfds feature 'coarse_label'")
            example[key] = int(arrays["coarse_labels"][i])
        elif key in ("id", "file_name"):
            names = arrays.get("filenames")
            example[key] = str(names[i]) if names is not None else f"jaxleak_{split}_{i:05d}"
        else:
            raise ValueError(f"prepare_tfds: no rule to fill tfds feature {key!r} of {name!r} from an npz subset")
    return example


def prepare_tfds(
    npz_path: str | pathlib.Path,
    name: str,
    data_dir: str | pathlib.Path,
    *,
    split: Optional[str] = None,
    limit: Optional[int] = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Prepare tfds dataset ``name`` in ``data_dir`` from an ``.npz`` subset, offline, without TensorFlow.

    Afterwards ``tfds.builder(name, data_dir=data_dir).is_prepared()`` is true and
    ``tfds.data_source(name, split=split, data_dir=data_dir, download=False)`` returns the
    subset's images (uint8 ``(H, W, C)``) and labels, record ``i`` = row ``i`` of the npz.
    So does ``jaxleak.data.load(name, data_dir=data_dir)``.

    Args:
      npz_path: a subset file with ``images`` uint8 ``(N, H, W, C)``, ``labels`` int ``(N,)``,
        ``class_names`` ``(K,)`` (plus ``coarse_labels`` for cifar100; ``filenames`` optional).
      name: the stock tfds name, e.g. ``"mnist"``, ``"cifar10"``, ``"lfw"``, ``"imagenet2012"``.
      data_dir: the tfds data folder to write into (``<data_dir>/<name>/<version>/``).
      split: split to write (default: :data:`DEFAULT_SPLIT` of ``name``).
      limit: write only the first ``limit`` examples.
      overwrite: regenerate when the dataset is already prepared there (else it is reused).

    Returns:
      The prepared version folder.
    """
    import tensorflow_datasets as tfds

    npz_path = pathlib.Path(npz_path)
    if not npz_path.is_file():
        raise FileNotFoundError(f"npz_path: expected an existing .npz subset, got {str(npz_path)!r}")
    if name not in DEFAULT_SPLIT:
        raise ValueError(f"name: expected one of {sorted(DEFAULT_SPLIT)}, got {name!r}")
    if limit is not None and (not isinstance(limit, (int, np.integer)) or limit < 1):
        raise ValueError(f"limit: expected a positive int or None, got {limit!r}")
    split = split or DEFAULT_SPLIT[name]
    stock = tfds.builder(name)
    if stock.builder_config is not None:
        raise ValueError(f"name: {name!r} has builder configs; prepare_tfds supports config-free builders only")

    with np.load(npz_path, allow_pickle=False) as z:
        keys = ("images", "labels", "class_names", "coarse_labels", "filenames")
        arrays = {k: z[k] for k in keys if k in z.files}  # one read per array: np.load unzips per access
    missing = {"images", "labels", "class_names"} - set(arrays)
    if missing:
        raise ValueError(f"npz_path: {str(npz_path)!r} lacks arrays {sorted(missing)}")
    images = arrays["images"]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"npz images: expected uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    class_names = tuple(str(c) for c in arrays["class_names"])
    label_feature = stock.info.features["label"]
    if isinstance(label_feature, tfds.features.ClassLabel) and label_feature.num_classes != len(class_names):
        raise ValueError(
            f"npz class_names: tfds {name!r} has {label_feature.num_classes} classes, the npz {len(class_names)}"
        )
    declared = stock.info.features["image"].shape
    if None not in declared and tuple(declared) != images.shape[1:]:
        warnings.warn(
            f"{name}: writing {images.shape[1:]} images where tfds declares {tuple(declared)}; "
            "tfds.data_source returns the stored size",
            stacklevel=2,
        )
    count = len(images) if limit is None else min(int(limit), len(images))
    features = stock.info.features

    def generate() -> Iterator[tuple[int, dict]]:
        for i in range(count):
            yield i, _example(features, i, arrays, class_names, name, split)

    class _SubsetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """The stock builder's name, version and features, filled from the npz subset."""

        name = stock.name
        VERSION = stock.version
        RELEASE_NOTES = {str(stock.version): f"written by jaxleak.data.prepare_tfds from {npz_path.name}"}

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"{name} subset from {npz_path.name} (jaxleak.data.prepare_tfds)",
                features=features,
                supervised_keys=stock.info.supervised_keys,
                disable_shuffling=True,  # record i is npz row i
            )

        def _split_generators(self, dl_manager):
            del dl_manager  # nothing to download
            return {split: self._generate_examples()}

        def _generate_examples(self):
            return generate()

    builder = _SubsetBuilder(data_dir=str(data_dir), file_format="array_record")
    mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(download_mode=mode, try_download_gcs=False)
    )
    return pathlib.Path(builder.data_dir)
