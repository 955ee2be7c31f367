"""``experiments/train_victims.py`` then ``experiments/trained_recovery.py --quick``: train, save, reload, recover.

A one-epoch LeNet is enough to exercise the whole chain (checkpoint and recipe,
the held-out split, head gradients checked against the full gradient, both
soft-label searches, the iDLG rule, the markdown table, resume). The Flowers-17
networks (AlexNet, ResNet18 at 64x64) take minutes per epoch on a CPU, so their
chain runs in the slow selection.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

import train_victims  # noqa: E402
import trained_recovery  # noqa: E402


def _train_and_recover(tmp_path, shared_data, model, regime, dataset):
    ckpt = tmp_path / "ckpt"
    recipe = train_victims.run(model, regime, 1, ckpt, npz_dir=shared_data, dataset=dataset, log=lambda *_: None)
    assert recipe["epochs_done"] == 1 and recipe["dataset_name"] == dataset
    assert 0.0 <= recipe["test_accuracy"] <= 1.0
    test_idx = np.asarray(recipe["split"]["test_indices"])
    per_class = train_victims.TEST_PER_CLASS[dataset]
    assert len(test_idx) == per_class * recipe["num_classes"]
    assert not set(test_idx) & set(np.asarray(recipe["split"]["train_indices"]))
    out = tmp_path / "rec"
    logs = []
    res = trained_recovery.run(out, quick=True, ckpt_dir=ckpt, npz_dir=shared_data, log=logs.append)
    return res, out, logs


def test_lenet_cifar10_chain(tmp_path, shared_data):
    res, out, logs = _train_and_recover(tmp_path, shared_data, "lenet", "mixup", "cifar10")
    entry = res["lenet_mixup"]
    k = 10
    assert entry["victims"] == 2 * k * (k - 1) // 2  # --quick: 2 draws per class pair
    for search in ("robust", "paper"):
        # Theorem 1 holds on trained networks too (the full run: 99.8-100 % of 900 mixup labels).
        assert entry[search]["label_maxabs_lt_1e-3"] >= 0.95, entry[search]
    assert set(entry["idlg_rowsum_accuracy"]) == {"trained", "untrained"}
    md = (out / "results.md").read_text()
    assert "| lenet (cifar10 32x32, mixup) |" in md
    doc = json.loads((out / "results.json").read_text())
    assert doc["summary"]["lenet_mixup"]["victims"] == entry["victims"]
    # Resume: the same checkpoint is not attacked again.
    logs.clear()
    again = trained_recovery.run(out, quick=True, ckpt_dir=tmp_path / "ckpt", npz_dir=shared_data, log=logs.append)
    assert again["lenet_mixup"] == json.loads(json.dumps(doc["summary"]["lenet_mixup"]))
    assert any("already in" in line for line in logs)


def test_train_victims_rejects_a_network_paper2_did_not_train(tmp_path):
    with pytest.raises(ValueError, match="flowers17"):
        train_victims.run("lenet", "mixup", 1, tmp_path, dataset="flowers17")
    with pytest.raises(ValueError, match="dataset"):
        train_victims.load_split(dataset="mnist")


@pytest.mark.slow
def test_alexnet_flowers17_chain(tmp_path, shared_data):
    res, out, _ = _train_and_recover(tmp_path, shared_data, "alexnet", "smoothing", "flowers17")
    entry = res["alexnet_smoothing_flowers17"]
    assert entry["victims"] == 5 * 17 and entry["dataset"] == "flowers17"
    assert entry["robust"]["ok"] > 0.9
    assert "| alexnet (flowers17 64x64, smoothing) |" in (out / "results.md").read_text()
