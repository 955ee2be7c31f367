"""Results files: incremental records, resume, config guard, CSV, figures."""

import json
import os

import numpy as np
import pytest

from jaxleak import report


def test_records_append_resume_and_survive_a_truncated_write(tmp_path):
    cfg = {"attack": "idlg", "victims": 4}
    assert report.start_run(tmp_path, cfg, resume=False) == []
    report.append_records(tmp_path, [{"victim": 0, "mse": np.float32(1e-5)}, {"victim": 1, "mse": float("nan")}])
    with (tmp_path / report.RECORDS).open("a") as f:
        f.write('{"victim": 2, "ms')  # killed mid-write
    with pytest.raises(FileExistsError, match="--resume"):
        report.start_run(tmp_path, cfg, resume=False)
    done = report.start_run(tmp_path, cfg, resume=True)
    assert [r["victim"] for r in done] == [0, 1]
    assert done[1]["mse"] is None  # NaN written as null, still valid JSON
    with pytest.raises(ValueError, match="differs in \\['victims'\\]"):
        report.start_run(tmp_path, {"attack": "idlg", "victims": 8}, resume=True)


def test_write_results_json_and_csv(tmp_path):
    recs = [{"victim": i, "label": i % 2, "mse": 0.1 * i, "history": [1.0, 0.5]} for i in range(3)]
    path = report.write_results(tmp_path, {"a": 1}, {"mean_mse": 0.1}, recs)
    doc = json.loads(path.read_text())
    assert doc["summary"] == {"mean_mse": 0.1} and len(doc["victims"]) == 3
    assert "jax" in doc["environment"]
    lines = (tmp_path / "results.csv").read_text().splitlines()
    assert lines[0] == "victim,label,mse" and len(lines) == 4


def test_unwritable_folder_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="not writable"):
        report.ensure_writable(blocker / "sub")


def test_figures_are_written(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.uniform(size=(3, 8, 8, 3))
    p1 = report.plot_reconstructions(tmp_path / "r.png", imgs, {"idlg": imgs}, captions={"idlg": ["a", "b", "c"]})
    p2 = report.plot_fidelity(tmp_path / "f.png", {"idlg": {"0.01": 0.5, "0.001": 0.25}},
                              reference={"idlg": {"0.01": 88.9, "0.001": 88.4}})
    p3 = report.plot_histogram(tmp_path / "h.png", {"err": [1e-6, 1e-3, np.nan]}, xlabel="err")
    for p in (p1, p2, p3):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.path.getsize(p) > 1000
