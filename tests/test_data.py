"""Tests for jaxleak.data: offline loading (tfds, npz subsets, skimage), preprocessing, sampling."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxleak import data

# (images shape, number of classes) per subset, from shared/data/README.md.
SUBSETS = {
    "mnist": ((10000, 28, 28, 1), 10),
    "cifar10": ((2000, 32, 32, 3), 10),
    "cifar100": ((10000, 32, 32, 3), 100),
    "lfw": ((5000, 32, 32, 3), 5749),
    "flowers17": ((1360, 64, 64, 3), 17),
    "imagenet2012": ((120, 224, 224, 3), 1000),
}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty npz folder (via JAXLEAK_DATA) and an empty tfds data_dir."""
    npz, tfds_dir = tmp_path / "npz", tmp_path / "tfds"
    npz.mkdir()
    tfds_dir.mkdir()
    monkeypatch.setenv("JAXLEAK_DATA", str(npz))
    return tfds_dir


# ----------------------------------------------------------------------------- tfds


@pytest.mark.parametrize("name, shape, classes", [("mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10)])
def test_tfds_mock_shapes_and_dtypes(name, shape, classes):
    with tfds.testing.mock_data(num_examples=6):
        full = data.load(name, source="tfds")
        part = data.load(name, source="tfds", limit=4)
    assert full.images.shape == (6,) + shape and full.images.dtype == np.uint8
    assert part.images.shape == (4,) + shape
    assert full.labels.dtype == np.int64 and full.labels.shape == (6,)
    assert ((0 <= full.labels) & (full.labels < classes)).all()
    assert len(full.class_names) == classes and full.source.startswith("tfds:")
    np.testing.assert_array_equal(part.images, full.images[:4])  # mock examples are fixed per index


def test_tfds_mock_string_labels_are_indexed():
    """LFW's tfds labels are person names: they become indices into class_names."""
    with tfds.testing.mock_data(num_examples=5):
        ds = data.load("lfw", source="tfds", size=16)
        source = tfds.data_source("lfw", split="train", download=False)
        names = [source[i]["label"] for i in range(5)]
    names = [n.decode() if isinstance(n, bytes) else n for n in names]
    assert ds.images.shape == (5, 16, 16, 3)
    assert [ds.class_names[i] for i in ds.labels] == names


def test_tfds_mock_mixed_sizes_need_size():
    with tfds.testing.mock_data(num_examples=3):
        ds = data.load("imagenet2012", source="tfds", size=(24, 20))
    assert ds.images.shape == (3, 24, 20, 3) and ds.num_classes == 1000


def test_prepare_tfds_round_trip(shared_data, tmp_path):
    """20 MNIST images written under the stock name read back identically through tfds.data_source."""
    npz = shared_data / "mnist_test.npz"
    with np.load(npz) as z:
        images, labels = z["images"][:20], z["labels"][:20]
    folder = data.prepare_tfds(npz, "mnist", tmp_path, limit=20)
    assert folder.is_dir() and tfds.builder("mnist", data_dir=str(tmp_path)).is_prepared()

    source = tfds.data_source("mnist", split="test", data_dir=str(tmp_path), download=False)
    assert len(source) == 20
    np.testing.assert_array_equal(np.stack([source[i]["image"] for i in range(20)]), images)
    np.testing.assert_array_equal([source[i]["label"] for i in range(20)], labels)

    ds = data.load("mnist", data_dir=tmp_path)  # auto: the prepared tfds copy wins over the npz
    assert ds.source == f"tfds:{tmp_path}"
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert data.available(data_dir=tmp_path)["mnist"] == f"tfds:{tmp_path}"


def test_prepare_tfds_lfw_labels_agree_with_npz(shared_data, tmp_path):
    with pytest.warns(UserWarning, match="declares"):  # 32x32 stored where tfds declares 250x250
        data.prepare_tfds(shared_data / "lfw32_subset.npz", "lfw", tmp_path, limit=12)
    via_tfds = data.load("lfw", data_dir=tmp_path, npz_dir=shared_data)
    via_npz = data.load("lfw", npz_dir=shared_data, source="npz", limit=12)
    assert via_tfds.source.startswith("tfds:") and len(via_tfds.class_names) == 5749
    np.testing.assert_array_equal(via_tfds.images, via_npz.images)
    np.testing.assert_array_equal(via_tfds.labels, via_npz.labels)


def test_prepare_tfds_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="npz_path"):
        data.prepare_tfds(tmp_path / "missing.npz", "mnist", tmp_path)
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.zeros(2), class_names=["a"])
    with pytest.raises(ValueError, match="name"):
        data.prepare_tfds(tmp_path / "x.npz", "flowers17", tmp_path)
    with pytest.raises(ValueError, match="10 classes"):
        data.prepare_tfds(tmp_path / "x.npz", "cifar10", tmp_path)


# ----------------------------------------------------------------------------- npz subsets


@pytest.mark.parametrize("name", sorted(SUBSETS))
def test_shared_subset_loads(shared_data, name):
    shape, classes = SUBSETS[name]
    ds = data.load(name, npz_dir=shared_data, source="npz")
    assert ds.images.shape == shape and ds.images.dtype == np.uint8
    assert ds.labels.shape == (shape[0],) and ds.labels.dtype == np.int64
    assert ds.num_classes == classes and ds.name == name
    assert 0 <= ds.labels.min() and ds.labels.max() < classes
    assert ds.source == str(shared_data / data.NPZ_FILES[name])
    assert ds.images.std() > 10  # real pictures, not a blank array
    assert not ds.images.flags.writeable and not ds.labels.flags.writeable


@pytest.mark.parametrize("name", ["mnist", "cifar100"])
def test_subset_limit_reads_prefix(shared_data, name):
    with np.load(shared_data / data.NPZ_FILES[name]) as z:
        images, labels = z["images"][:37], z["labels"][:37]
    ds = data.load(name, npz_dir=shared_data, limit=37)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)


def test_jaxleak_data_env_is_used(shared_data, monkeypatch):
    monkeypatch.setenv("JAXLEAK_DATA", str(shared_data))
    assert data.load("cifar10", limit=3, source="npz").source == str(shared_data / "cifar10_subset.npz")


def test_npz_path_loads_directly_and_resizes(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 8, 6, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2, 0])
    np.savez_compressed(tmp_path / "toy.npz", images=images, labels=labels, class_names=np.array(["a", "b", "c"]))
    ds = data.load(tmp_path / "toy.npz", limit=5)
    assert ds.name == "toy" and ds.class_names == ("a", "b", "c")
    np.testing.assert_array_equal(ds.images, images[:5])
    np.testing.assert_array_equal(ds.labels, labels[:5])
    small = data.load(str(tmp_path / "toy.npz"), size=4)
    assert small.images.shape == (7, 4, 4, 3) and small.images.dtype == np.uint8

    np.savez(tmp_path / "bad.npz", images=images)
    with pytest.raises(ValueError, match="labels"):
        data.load(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load(tmp_path / "absent.npz")


# ----------------------------------------------------------------------------- built-in default


def test_default_skimage_dataset_offline():
    ds = data.load()
    assert ds.name == "skimage" and ds.source.startswith("skimage:")
    assert len(ds) >= 24 and ds.images.shape[1:] == (32, 32, 3) and ds.images.dtype == np.uint8
    assert set(ds.labels.tolist()) == set(range(ds.num_classes))  # every class has an image
    assert {"astronaut", "chelsea", "face", "non_face"} <= set(ds.class_names)
    astronaut = ds.images[ds.class_names.index("astronaut") == ds.labels][0]
    assert astronaut.std() > 20 and np.ptp(astronaut.reshape(-1, 3).mean(0)) > 1  # a colour photo
    faces = ds.images[ds.labels == ds.class_names.index("face")]
    assert len(faces) == 100
    np.testing.assert_array_equal(faces[..., 0], faces[..., 1])  # grey faces as RGB


def test_skimage_size_and_limit():
    ds = data.load("skimage", size=(16, 16), limit=5)
    assert ds.images.shape == (5, 16, 16, 3)


# ----------------------------------------------------------------------------- errors and availability


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown dataset 'nope'") as err:
        data.load("nope")
    for name in data.KNOWN_NAMES:
        assert name in str(err.value)


@pytest.mark.parametrize("name", ["cifar10", "lfw"])
def test_not_available_offline_says_how(offline, name):
    with pytest.raises(FileNotFoundError) as err:
        data.load(name, data_dir=offline)
    message = str(err.value)
    assert "not available offline" in message and "prepare_tfds" in message
    assert "data_dir" in message and "JAXLEAK_DATA" in message and data.NPZ_FILES[name] in message


def test_not_available_without_tfds_builder_mentions_only_npz(offline):
    with pytest.raises(FileNotFoundError) as err:
        data.load("flowers17", data_dir=offline)
    assert "JAXLEAK_DATA" in str(err.value) and "prepare_tfds" not in str(err.value)


def test_available_offline_empty(offline):
    found = data.available(data_dir=offline)
    assert set(found) == set(data.KNOWN_NAMES)
    assert found["skimage"] is not None
    assert all(v is None for k, v in found.items() if k != "skimage")


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="limit"):
        data.load("skimage", limit=-1)
    with pytest.raises(ValueError, match="size"):
        data.load("skimage", size=(0, 3))
    with pytest.raises(ValueError, match="source"):
        data.load("cifar10", source="web")
    with pytest.raises(ValueError, match="images"):
        data.Dataset(np.zeros((2, 4, 4, 3), np.float32), np.zeros(2, np.int64), ("a",), "x", "y")


# ----------------------------------------------------------------------------- preprocessing


def test_normalize_denormalize_exact_inverse():
    x = jax.random.uniform(jax.random.key(0), (2, 5, 5, 3))
    y = data.normalize(x)
    expected = (np.asarray(x) - np.array(data.CIFAR10_MEAN)) / np.array(data.CIFAR10_STD)
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(data.denormalize(y), x, rtol=0, atol=1e-6)
    np.testing.assert_allclose(jax.jit(data.denormalize)(jax.jit(data.normalize)(x)), x, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(data.normalize)(x), y, rtol=1e-6)
    with jax.enable_x64(True):
        x64 = jnp.asarray(np.asarray(x), jnp.float64)
        back = data.denormalize(data.normalize(x64))
        assert back.dtype == jnp.float64
        np.testing.assert_allclose(back, x64, rtol=0, atol=1e-15)


def test_normalize_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match="mean/std"):
        data.normalize(jnp.zeros((4, 4, 2)))


def test_to_float_resize_grayscale():
    u8 = jnp.array([[[[0], [255]], [[51], [102]]]], jnp.uint8)  # (1, 2, 2, 1)
    f = jax.jit(data.to_float)(u8)
    assert f.dtype == jnp.float32
    np.testing.assert_allclose(f[0, :, :, 0], [[0.0, 1.0], [0.2, 0.4]], atol=1e-7)
    with pytest.raises(ValueError, match="uint8"):
        data.to_float(jnp.zeros((2, 2, 1)))

    rgb = data.grayscale_to_rgb(f)
    assert rgb.shape == (1, 2, 2, 3)
    np.testing.assert_array_equal(rgb[..., 2], f[..., 0])
    with pytest.raises(ValueError, match="channels"):
        data.grayscale_to_rgb(jnp.zeros((2, 2, 2)))

    flat = jnp.full((3, 8, 8, 3), 0.25)
    out = data.resize(flat, (4, 6))
    assert out.shape == (3, 4, 6, 3)
    np.testing.assert_allclose(out, 0.25, atol=1e-6)  # a constant image stays constant
    np.testing.assert_allclose(jax.vmap(lambda im: data.resize(im, (4, 6)))(flat), out, atol=1e-6)


# ----------------------------------------------------------------------------- sampling


def test_sample_per_class_counts_and_determinism():
    labels = np.repeat(np.arange(5), [3, 7, 1, 4, 9])
    idx = data.sample_per_class(labels, 6, 2023)
    assert idx.shape == (30,) and idx.dtype == np.int64
    np.testing.assert_array_equal(labels[idx], np.repeat(np.arange(5), 6))  # class by class
    np.testing.assert_array_equal(idx, data.sample_per_class(labels, 6, 2023))
    assert not np.array_equal(idx, data.sample_per_class(labels, 6, 2024))
    key = jax.random.key(1)
    np.testing.assert_array_equal(data.sample_per_class(labels, 6, key), data.sample_per_class(labels, 6, key))

    distinct = data.sample_per_class(labels[labels != 2], 3, 0, replace=False).reshape(4, 3)
    assert all(len(set(row)) == 3 for row in distinct)
    with pytest.raises(ValueError, match="per_class"):
        data.sample_per_class(labels, 2, 0, replace=False)  # class 2 has one example


def test_mixup_pairs_properties():
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 12))
    first, second = data.mixup_pairs(labels, 10, 3, 2023)
    assert first.shape == second.shape == (45 * 3,)
    assert (labels[first] < labels[second]).all()  # two distinct classes per pair, i < j
    pairs = list(zip(labels[first].tolist(), labels[second].tolist()))
    expected = [p for p in itertools.combinations(range(10), 2) for _ in range(3)]
    assert pairs == expected
    again = data.mixup_pairs(labels, 10, 3, 2023)
    np.testing.assert_array_equal(first, again[0])
    np.testing.assert_array_equal(second, again[1])
    assert not np.array_equal(first, data.mixup_pairs(labels, 10, 3, 7)[0])
    with pytest.raises(ValueError, match="no examples"):
        data.mixup_pairs(labels[labels != 4], 10, 1, 0)
