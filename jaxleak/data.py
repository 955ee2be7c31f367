"""Victim data: tfds datasets by name, the offline ``.npz`` subsets, a built-in default, preprocessing.

Loading (numpy, host side): :func:`load` returns a :class:`Dataset` of uint8 NHWC images,
int64 labels and class names. Sources, in order:

1. ``tfds.data_source(name, split, data_dir, download=False)`` when
   ``tfds.builder(name, data_dir=data_dir).is_prepared()`` (never downloads);
2. the real ``.npz`` subsets (an explicit ``npz_dir``, else ``$JAXLEAK_DATA``, else -- only when
   running from a source checkout -- ``<repo>/../shared/data``), see :data:`NPZ_FILES`;
3. ``"skimage"``: photographs shipped inside scikit-image, always available offline.

:func:`jaxleak.data.prepare_tfds` writes an npz subset into a tfds ``data_dir`` under the real tfds
name, offline, so that path 1 works on machines that cannot download.

Preprocessing (pure ``jax.numpy``, ``jit``/``vmap``-compatible): :func:`to_float`, :func:`resize`,
:func:`grayscale_to_rgb`, :func:`normalize`/:func:`denormalize` with the CIFAR-10 statistics that
Wang, Liang, He (ICLR 2024) apply to every dataset (ALGORITHMS.md §4.10).

Sampling (numpy, deterministic by seed): :func:`sample_per_class` and :func:`mixup_pairs`, the
label-smoothing and mixup protocols of paper 2 (ALGORITHMS.md §5.2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import pathlib
import zipfile
from typing import Optional, Sequence, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxleak._tfds_subsets import DEFAULT_SPLIT, prepare_tfds

Array = jax.Array
Size = Union[int, tuple[int, int]]

# Paper 2 normalises every dataset with these CIFAR-10 statistics (ALGORITHMS.md §4.10).
CIFAR10_MEAN = (0.4914672, 0.4822617, 0.4467701)
CIFAR10_STD = (0.2470322, 0.2434851, 0.2615879)

TFDS_NAMES = ("mnist", "cifar10", "cifar100", "lfw", "imagenet2012", "oxford_flowers102")
NPZ_FILES = {
    "mnist": "mnist_test.npz",
    "cifar10": "cifar10_subset.npz",
    "cifar100": "cifar100_subset.npz",
    "lfw": "lfw32_subset.npz",
    "flowers17": "flowers17_64.npz",  # no tfds builder exists for Flowers-17
    "imagenet2012": "imagenet224_sample.npz",
}
SKIMAGE = "skimage"
KNOWN_NAMES = (SKIMAGE,) + TFDS_NAMES + ("flowers17",)

# Colour and grey photographs inside the scikit-image wheel (no download), one class each.
_SKIMAGE_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
    "retina", "motorcycle_left", "motorcycle_right", "camera", "moon", "coins", "clock",
)
_REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image set held in host memory.

    Arrays are read-only views (copy before editing in place).

    Attributes:
      images: uint8 ``(N, H, W, C)``.
      labels: int64 ``(N,)``, indices into ``class_names``.
      class_names: ``K`` names.
      name: the dataset name (tfds name, ``"flowers17"``, ``"skimage"`` or the npz file stem).
      source: where it came from: ``"tfds:<data_dir>"``, the npz path, or ``"skimage:<version>"``.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    name: str
    source: str

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images: expected uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],) or not np.issubdtype(self.labels.dtype, np.integer):
            raise ValueError(f"labels: expected int ({self.images.shape[0]},), got {self.labels.dtype} {self.labels.shape}")
        for field in ("images", "labels"):  # frozen means frozen: read-only views, the caller's arrays untouched
            view = getattr(self, field).view()
            view.flags.writeable = False
            object.__setattr__(self, field, view)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def take(self, indices: Sequence[int] | np.ndarray) -> "Dataset":
        """The examples at ``indices`` (e.g. from :func:`sample_per_class`), same classes and source."""
        indices = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(self, images=self.images[indices], labels=self.labels[indices])


# --------------------------------------------------------------------------- locating data


def source_checkout() -> Optional[pathlib.Path]:
    """The checkout jaxleak runs from (editable install: ``pyproject.toml`` beside the package), else None."""
    return _REPO if (_REPO / "pyproject.toml").is_file() else None


def npz_folder(npz_dir: str | os.PathLike | None = None) -> Optional[pathlib.Path]:
    """The folder searched for subsets: ``npz_dir``, else ``$JAXLEAK_DATA``, else ``<checkout>/../shared/data``.

    The last default applies only when jaxleak runs from a source checkout (``pip install -e .``); a regular
    (wheel) install reads subsets only from ``npz_dir`` or ``$JAXLEAK_DATA``.
    """
    if npz_dir is not None:
        return pathlib.Path(npz_dir)
    if os.environ.get("JAXLEAK_DATA"):
        return pathlib.Path(os.environ["JAXLEAK_DATA"])
    checkout = source_checkout()
    if checkout is None:
        return None
    default = checkout.parent / "shared" / "data"
    return default if default.is_dir() else None


def _npz_path(name: str, npz_dir) -> Optional[pathlib.Path]:
    folder = npz_folder(npz_dir)
    if folder is None or name not in NPZ_FILES:
        return None
    path = folder / NPZ_FILES[name]
    return path if path.is_file() else None


def _tfds_builder(name: str, data_dir):
    """The stock builder when ``name`` is prepared in ``data_dir`` (never downloads), else None."""
    if name not in TFDS_NAMES:
        return None
    import tensorflow_datasets as tfds

    with _quiet_absl():  # an absent dataset is an expected answer here, not a warning
        builder = tfds.builder(name, data_dir=None if data_dir is None else str(data_dir))
        return builder if builder.is_prepared() else None


@contextlib.contextmanager
def _quiet_absl():
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _tfds_source(builder) -> str:
    # <data_dir>/<name>/<version>: report the data_dir the caller passes back in.
    return f"tfds:{pathlib.Path(builder.data_dir).parents[1]}"


def available(data_dir=None, npz_dir=None) -> dict[str, Optional[str]]:
    """Which datasets :func:`load` can serve offline right now, and from where.

    Returns:
      ``{name: source or None}`` for every name in :data:`KNOWN_NAMES`; ``source`` is
      ``"tfds:<data_dir>"``, an npz path, or ``"skimage (built-in)"``; None = not available.
    """
    found: dict[str, Optional[str]] = {}
    for name in KNOWN_NAMES:
        builder = _tfds_builder(name, data_dir)
        path = _npz_path(name, npz_dir)
        if name == SKIMAGE:
            found[name] = "skimage (built-in)"
        elif builder is not None:
            found[name] = _tfds_source(builder)
        else:
            found[name] = None if path is None else str(path)
    return found


def _not_available(name: str, data_dir, npz_dir) -> FileNotFoundError:
    folder = npz_folder(npz_dir)
    lines = [f"dataset {name!r} is not available offline."]
    if name in TFDS_NAMES:
        lines.append(f"  tfds: not prepared in data_dir={data_dir or '$TFDS_DATA_DIR or ~/tensorflow_datasets'}")
    if name in NPZ_FILES:
        if folder is not None:
            searched = f"searched {folder}"
        elif source_checkout() is not None:
            searched = "JAXLEAK_DATA is unset and <repo>/../shared/data is absent"
        else:
            searched = "JAXLEAK_DATA is unset and npz_dir not given"
        lines.append(f"  npz: no {NPZ_FILES[name]} ({searched})")
    lines.append("Make it available in one of these ways:")
    if name in TFDS_NAMES:
        npz = NPZ_FILES.get(name, "<subset>.npz")
        lines.append(
            f"  1. prepare a tfds data_dir: with network, tfds.builder({name!r}, data_dir=DIR).download_and_prepare(); "
            f"offline, jaxleak.data.prepare_tfds('<folder>/{npz}', {name!r}, DIR); "
            "then pass data_dir=DIR (or set TFDS_DATA_DIR=DIR)."
        )
    if name in NPZ_FILES:
        lines.append(
            f"  2. point JAXLEAK_DATA at the folder holding {NPZ_FILES[name]} (the shared data subsets), "
            "or pass npz_dir=<folder>."
        )
    return FileNotFoundError("\n".join(lines))


# --------------------------------------------------------------------------- readers


def _read_npz(path: pathlib.Path, keys: Sequence[str], limit: Optional[int]) -> dict[str, np.ndarray]:
    """Read ``keys`` of an npz once each; per-example arrays stop after ``limit`` rows.

    ``np.load`` would decompress a whole member on every access; here each member is streamed
    once and, with ``limit``, only the first ``limit`` rows of ``images``/``labels`` are read.
    """
    out = {}
    with zipfile.ZipFile(path) as archive:
        members = {m[:-4]: m for m in archive.namelist() if m.endswith(".npy")}
        missing = [k for k in keys if k not in members]
        if missing:
            raise ValueError(f"npz {str(path)!r}: missing arrays {missing}; expected images, labels, class_names")
        for key in keys:
            with archive.open(members[key]) as f:
                version = np.lib.format.read_magic(f)
                header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = header(f)
                if dtype.hasobject:
                    raise ValueError(f"npz {str(path)!r}: array {key!r} holds Python objects; expected plain arrays")
                if fortran and limit is not None and len(shape) > 1:
                    raise ValueError(f"npz {str(path)!r}: Fortran-ordered {key!r} cannot be read by rows")
                rows = shape[0] if (limit is None or not shape or key == "class_names") else min(limit, shape[0])
                count = rows * int(np.prod(shape[1:], dtype=np.int64)) if shape else 1
                data = np.frombuffer(f.read(count * dtype.itemsize), dtype=dtype, count=count)
                full = (rows,) + tuple(shape[1:]) if shape else ()
                out[key] = data.reshape(full[::-1]).T if fortran else data.reshape(full)
    return out


def _load_npz(path: pathlib.Path, name: str, limit: Optional[int]) -> Dataset:
    arrays = _read_npz(path, ("images", "labels", "class_names"), limit)
    return Dataset(
        images=np.ascontiguousarray(arrays["images"]),
        labels=arrays["labels"].astype(np.int64),
        class_names=tuple(str(c) for c in arrays["class_names"]),
        name=name,
        source=str(path),
    )


def _load_tfds(name: str, split: str, data_dir, limit: Optional[int], size, npz_dir) -> Dataset:
    """Read the first ``limit`` records of a tfds split through ``tfds.data_source`` (no TensorFlow)."""
    import tensorflow_datasets as tfds

    kwargs = {} if data_dir is None else {"data_dir": str(data_dir)}
    source = tfds.data_source(name, split=split, download=False, **kwargs)
    count = len(source) if limit is None else min(limit, len(source))
    records = [source[i] for i in range(count)]
    images = [np.asarray(r["image"]) for r in records]
    raw = [r["label"] for r in records]
    label_feature = source.dataset_info.features["label"]
    if isinstance(label_feature, tfds.features.ClassLabel):
        class_names = tuple(label_feature.names)
        labels = np.asarray(raw, dtype=np.int64).reshape(count)
    else:
        # LFW labels are person names: index them in the npz subset's list of all 5,749 people when
        # it is at hand (so both sources agree), else in the sorted names seen.
        names = [x.decode() if isinstance(x, bytes) else str(x) for x in raw]
        npz = _npz_path(name, npz_dir)
        class_names = _read_npz(npz, ("class_names",), None)["class_names"] if npz else ()
        class_names = tuple(str(c) for c in class_names)
        if not set(names) <= set(class_names):
            class_names = tuple(sorted(set(names)))
        index = {c: i for i, c in enumerate(class_names)}
        labels = np.asarray([index[n] for n in names], dtype=np.int64).reshape(count)
    builder = tfds.builder(name, data_dir=None if data_dir is None else str(data_dir))
    return Dataset(_stack(images, size, name), labels, class_names, name=name, source=_tfds_source(builder))


def _pil_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL bicubic resize of one uint8 ``(H, W, C)`` image to ``size = (h, w)`` (paper 2's plain resize)."""
    from PIL import Image

    if image.shape[:2] == tuple(size):
        return image
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out = np.asarray(pil.resize((size[1], size[0]), Image.BICUBIC))
    return out.reshape(size + image.shape[2:])


def _stack(images: list[np.ndarray], size: Optional[tuple[int, int]], name: str) -> np.ndarray:
    images = [im[..., None] if im.ndim == 2 else im for im in images]
    if size is not None:
        images = [_pil_resize(im, size) for im in images]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"size: {name!r} has images of several shapes {sorted(shapes)[:3]}...; pass size=(h, w)")
    if not images:
        return np.zeros((0,) + (size or (0, 0)) + (3,), np.uint8)
    return np.stack(images).astype(np.uint8, copy=False)


def _centre_square(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return image[top : top + s, left : left + s]


def _as_rgb_u8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:  # skimage's float/bool images in [0, 1]
        image = np.round(np.clip(image.astype(np.float64), 0, 1) * 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return image[..., :3]


def _load_skimage(size: tuple[int, int], limit: Optional[int]) -> Dataset:
    """Real photographs from the scikit-image wheel: one class per photo, plus 100 faces / 100 non-faces.

    Each image is centre-cropped to a square and PIL-bicubic resized to ``size``, RGB uint8.
    ``skimage.data.lfw_subset()`` holds 200 grey 25x25 crops, the first 100 faces (class "face"),
    the rest not (class "non_face"); they carry no identities.
    """
    import skimage
    import skimage.data

    images, labels, class_names = [], [], []
    for photo in _SKIMAGE_PHOTOS:
        if photo.startswith("motorcycle"):
            left, right, _ = skimage.data.stereo_motorcycle()
            image = left if photo.endswith("left") else right
        else:
            image = getattr(skimage.data, photo)()
        images.append(_pil_resize(_centre_square(_as_rgb_u8(image)), size))
        labels.append(len(class_names))
        class_names.append(photo)
    faces = skimage.data.lfw_subset()
    face, non_face = len(class_names), len(class_names) + 1
    class_names += ["face", "non_face"]
    for i, image in enumerate(faces):
        images.append(_pil_resize(_as_rgb_u8(image), size))
        labels.append(face if i < len(faces) // 2 else non_face)
    count = len(images) if limit is None else min(limit, len(images))
    return Dataset(
        images=np.stack(images[:count]),
        labels=np.asarray(labels[:count], dtype=np.int64),
        class_names=tuple(class_names),
        name=SKIMAGE,
        source=f"skimage:{skimage.__version__}",
    )


def _as_size(size, argument: str = "size") -> Optional[tuple[int, int]]:
    if size is None:
        return None
    pair = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in pair):
        raise ValueError(f"{argument}: expected a positive int or (h, w), got {size!r}")
    return (int(pair[0]), int(pair[1]))


def load(
    name: str = SKIMAGE,
    split: Optional[str] = None,
    *,
    data_dir: str | os.PathLike | None = None,
    npz_dir: str | os.PathLike | None = None,
    limit: Optional[int] = None,
    size: Optional[Size] = None,
    source: str = "auto",
) -> Dataset:
    """Load victim images offline: tfds (if prepared), else the npz subset, else a clear error.

    Args:
      name: one of :data:`KNOWN_NAMES` (tfds names, ``"flowers17"``, ``"skimage"``) or a path to an
        ``.npz`` file (``images`` uint8 NHWC, ``labels`` int, ``class_names``).
      split: tfds split (default :data:`DEFAULT_SPLIT`; the npz subsets have one split each).
      data_dir: tfds data folder (default: tfds' own, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      npz_dir: folder of the npz subsets (default ``$JAXLEAK_DATA``, else, from a source checkout only,
        ``<repo>/../shared/data``).
      limit: keep the first ``limit`` examples; only those are read (tfds records, npz rows).
      size: ``(h, w)`` or an int: PIL bicubic resize, no crop (paper 2). ``"skimage"`` defaults to 32
        and centre-crops to a square first.
      source: ``"auto"``, or force ``"tfds"`` (skips the ``is_prepared`` check) or ``"npz"``.

    Returns:
      A :class:`Dataset`: images uint8 ``(N, H, W, C)``, labels int64 ``(N,)``, class names.

    Raises:
      ValueError: unknown ``name`` (the message lists the known names) or bad arguments.
      FileNotFoundError: known but not available offline; the message says how to provide it.
    """
    if limit is not None and (not isinstance(limit, (int, np.integer)) or limit < 0):
        raise ValueError(f"limit: expected a non-negative int or None, got {limit!r}")
    if source not in ("auto", "tfds", "npz"):
        raise ValueError(f"source: expected 'auto', 'tfds' or 'npz', got {source!r}")
    size = _as_size(size)
    limit = None if limit is None else int(limit)
    if str(name).endswith(".npz") or isinstance(name, os.PathLike):
        path = pathlib.Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"name: npz file {str(path)!r} does not exist")
        return _resized(_load_npz(path, path.stem, limit), size)
    if name not in KNOWN_NAMES:
        raise ValueError(f"name: unknown dataset {name!r}; known names are {', '.join(KNOWN_NAMES)} (or an .npz path)")
    if name == SKIMAGE:
        return _load_skimage(size or (32, 32), limit)
    split = split or DEFAULT_SPLIT.get(name)
    if source == "tfds" or (source == "auto" and _tfds_builder(name, data_dir) is not None):
        if name not in TFDS_NAMES:
            raise ValueError(f"source: {name!r} has no tfds builder; use source='npz'")
        return _load_tfds(name, split, data_dir, limit, size, npz_dir)
    path = _npz_path(name, npz_dir)
    if path is None:
        raise _not_available(name, data_dir, npz_dir)
    return _resized(_load_npz(path, name, limit), size)


def _resized(dataset: Dataset, size: Optional[tuple[int, int]]) -> Dataset:
    if size is None or dataset.images.shape[1:3] == size:
        return dataset
    return dataclasses.replace(dataset, images=_stack(list(dataset.images), size, dataset.name))


# --------------------------------------------------------------------------- preprocessing (jnp)


def to_float(images: Array) -> Array:
    """uint8 images ``(..., H, W, C)`` -> float32 in [0, 1] (``ToTensor`` of paper 2's code, NHWC)."""
    if jnp.asarray(images).dtype != jnp.uint8:
        raise ValueError(f"images: expected uint8, got {jnp.asarray(images).dtype}")
    return jnp.asarray(images, jnp.float32) / 255.0


def resize(images: Array, shape: tuple[int, int], method: str = "cubic") -> Array:
    """Resize float images ``(H, W, C)`` or ``(N, H, W, C)`` to ``shape = (h, w)`` with ``jax.image.resize``.

    Antialiased when shrinking. Host-side loading uses PIL bicubic instead (``load(size=...)``), which
    the papers used; the two differ by interpolation details, not by geometry.
    """
    images = jnp.asarray(images)
    chex.assert_rank(images, {3, 4})
    h, w = _as_size(shape, "shape")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        images = images.astype(jnp.float32)
    return jax.image.resize(images, images.shape[:-3] + (h, w, images.shape[-1]), method=method, antialias=True)


def grayscale_to_rgb(images: Array) -> Array:
    """Repeat a single channel ``(..., H, W, 1)`` to ``(..., H, W, 3)``; RGB input is returned as is."""
    images = jnp.asarray(images)
    if images.shape[-1] == 3:
        return images
    if images.shape[-1] != 1:
        raise ValueError(f"images: expected 1 or 3 channels (last axis), got shape {images.shape}")
    return jnp.repeat(images, 3, axis=-1)


def _channel_stats(x: Array, mean, std) -> tuple[Array, Array]:
    mean, std = jnp.asarray(mean, x.dtype), jnp.asarray(std, x.dtype)
    if mean.ndim > 1 or std.ndim > 1 or (mean.ndim == 1 and mean.shape[0] not in (1, x.shape[-1])):
        raise ValueError(f"mean/std: expected a scalar or one value per channel ({x.shape[-1]}), got {mean.shape}")
    return mean, std


def normalize(x: Array, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> Array:
    """Per-channel ``(x - mean) / std`` on ``(..., C)``: torchvision ``Normalize`` as in paper 2 (§4.10)."""
    x = jnp.asarray(x)
    mean, std = _channel_stats(x, mean, std)
    return (x - mean) / std


def denormalize(x: Array, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> Array:
    """The inverse of :func:`normalize`: ``x * std + mean`` on ``(..., C)``."""
    x = jnp.asarray(x)
    mean, std = _channel_stats(x, mean, std)
    return x * std + mean


# --------------------------------------------------------------------------- sampling (numpy)


def _rng(key_or_seed) -> np.random.Generator:
    """A numpy generator from an int seed or a JAX PRNG key (its key data seed the generator)."""
    if isinstance(key_or_seed, (int, np.integer)):
        return np.random.default_rng(int(key_or_seed))
    key = jnp.asarray(key_or_seed) if not hasattr(key_or_seed, "dtype") else key_or_seed
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng(np.asarray(key, dtype=np.uint32).ravel().tolist())


def _class_members(labels, num_classes: Optional[int] = None) -> list[np.ndarray]:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels: expected integer (N,), got {labels.dtype} {labels.shape}")
    classes = range(num_classes) if num_classes is not None else np.unique(labels)
    return [np.flatnonzero(labels == c) for c in classes]


def sample_per_class(labels, per_class: int, key_or_seed, replace: bool = True) -> np.ndarray:
    """Indices of ``per_class`` examples of every class present in ``labels``, drawn per class.

    Paper 2's label-smoothing protocol (ALGORITHMS.md §5.2): for each class, ``numpy.choice`` of
    ``per_class`` positions in that class's list, with replacement by default.

    Args:
      labels: int ``(N,)``.
      per_class: examples per class.
      key_or_seed: int seed or JAX PRNG key; the same value gives the same indices.
      replace: draw with replacement (paper 2) or not (then every class needs ``per_class`` examples).

    Returns:
      int64 ``(K * per_class,)``, class by class in increasing label order.
    """
    if not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise ValueError(f"per_class: expected a positive int, got {per_class!r}")
    rng = _rng(key_or_seed)
    out = []
    for members in _class_members(labels):
        if not replace and len(members) < per_class:
            raise ValueError(f"per_class: {per_class} without replacement, but a class has only {len(members)}")
        out.append(rng.choice(members, size=per_class, replace=replace))
    return np.concatenate(out).astype(np.int64)


def mixup_pairs(labels, num_classes: int, per_pair: int, seed) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs for the mixup protocol: each unordered class pair ``(i < j)`` x ``per_pair``.

    Paper 2 (ALGORITHMS.md §5.2): for the 45 CIFAR-10 pairs ``itertools.combinations(range(10), 2)``,
    ``per_pair`` times draw one image of class ``i`` and one of class ``j`` uniformly.

    Args:
      labels: int ``(N,)``; every class ``0..num_classes-1`` must occur.
      num_classes: ``K``.
      per_pair: draws per class pair.
      seed: int seed or JAX PRNG key.

    Returns:
      ``(first, second)``, int64 ``(K(K-1)/2 * per_pair,)`` each, pair by pair in
      ``combinations`` order; ``labels[first] < labels[second]`` elementwise.
    """
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes: expected an int >= 2, got {num_classes!r}")
    if not isinstance(per_pair, (int, np.integer)) or per_pair < 1:
        raise ValueError(f"per_pair: expected a positive int, got {per_pair!r}")
    members = _class_members(labels, num_classes)
    empty = [c for c, m in enumerate(members) if len(m) == 0]
    if empty:
        raise ValueError(f"labels: classes {empty[:10]} have no examples; mixup needs all {num_classes}")
    rng = _rng(seed)
    first, second = [], []
    for i, j in itertools.combinations(range(num_classes), 2):
        first.append(rng.choice(members[i], size=per_pair))
        second.append(rng.choice(members[j], size=per_pair))
    return np.concatenate(first).astype(np.int64), np.concatenate(second).astype(np.int64)


__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "DEFAULT_SPLIT", "KNOWN_NAMES", "NPZ_FILES", "TFDS_NAMES",
    "Dataset", "available", "load", "npz_folder", "prepare_tfds",
    "to_float", "resize", "grayscale_to_rgb", "normalize", "denormalize",
    "sample_per_class", "mixup_pairs",
]
