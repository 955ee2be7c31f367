"""The jaxleak command: user mistakes exit 2 with one line; recover/data/attack work and resume."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxleak as jl
from jaxleak import cli, report


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _gradient_file(path, kind="smoothing", batched=False, torch_layout=False, bias=True):
    model = jl.LeNet(10, head_bias=bias)
    xs = jax.random.uniform(jax.random.PRNGKey(0), (3, 16, 16, 3))
    v = jl.models.init_uniform(model.init(jax.random.PRNGKey(1), xs[:1]), jax.random.PRNGKey(2))
    ys = jl.smooth(jnp.array([1, 4, 7]), 10, jnp.array([0.1, 0.2, 0.3])) if kind == "smoothing" else jl.one_hot(jnp.array([1, 4, 7]), 10)
    g = jl.gradients(model.apply, v, xs, ys)
    W, b = jl.last_layer(v)
    G, db = jl.last_layer(g)
    arrays = {"weight": np.broadcast_to(W, G.shape) if batched else W, "weight_grad": G if batched else G[0]}
    if bias:
        arrays.update(bias=np.broadcast_to(b, db.shape) if batched else b, bias_grad=db if batched else db[0])
    if torch_layout:
        arrays["weight"] = np.swapaxes(arrays["weight"], -1, -2)
        arrays["weight_grad"] = np.swapaxes(arrays["weight_grad"], -1, -2)
    np.savez(path, **arrays)
    return ys


@pytest.mark.parametrize("torch_layout", [False, True])
def test_recover_soft_labels_from_a_file(tmp_path, capsys, torch_layout):
    f = tmp_path / "g.npz"
    ys = _gradient_file(f, batched=True, torch_layout=torch_layout)
    args = [str(f), "--kind", "smoothing", "--json", "--out", str(tmp_path / "r.npz")]
    code, out, _ = _run(capsys, "recover", *args, *(["--layout", "torch"] if torch_layout else []))
    assert code == 0
    rows = json.loads(out)["victims"]
    assert [r["class"] for r in rows] == [1, 4, 7]
    np.testing.assert_allclose([r["epsilon"] for r in rows], [0.1, 0.2, 0.3], atol=1e-4)
    with np.load(tmp_path / "r.npz") as z:
        np.testing.assert_allclose(z["label"], ys, atol=1e-4)


def test_recover_onehot_single_victim(tmp_path, capsys):
    f = tmp_path / "g.npz"
    _gradient_file(f, kind="onehot", batched=False)
    code, out, _ = _run(capsys, "recover", str(f), "--json")
    assert code == 0 and json.loads(out)["victims"] == [{"victim": 0, "label": 1}]


def test_user_mistakes_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    f = tmp_path / "g.npz"
    _gradient_file(f, batched=True)
    with np.load(f) as z:
        bad = {k: z[k] for k in z.files}
    bad["weight_grad"][0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", **bad)
    np.savez(tmp_path / "missing.npz", weight=bad["weight"])
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("JAXLEAK_DATA", str(tmp_path / "empty"))
    cases = [
        (["recover", str(tmp_path / "nan.npz")], "NaN"),
        (["recover", str(tmp_path / "missing.npz")], "no 'weight_grad'"),
        (["recover", str(tmp_path / "nope.npz")], "does not exist"),
        (["recover", str(f), "--layout", "torch"], "wrong --layout"),
        (["attack", "--dataset", "imagenet9000", "--out", str(tmp_path / "o")], "unknown"),
        (["attack", "--dataset", "cifar10", "--out", str(tmp_path / "o2")], "JAXLEAK_DATA"),
        (["attack", "--out", str(blocker / "sub")], "not writable"),
        (["attack", "--epsilon", "1.5", "--out", str(tmp_path / "o3")], "epsilon"),
        (["data", "--prepare", "mnist"], "--data-dir"),
    ]
    for argv, needle in cases:
        code, out, err = _run(capsys, *argv)
        assert code == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("jaxleak: error:") and needle in lines[0], (argv, err)
        assert "Traceback" not in err
    with pytest.raises(SystemExit) as e:  # argparse: unknown model choice
        cli.main(["attack", "--model", "vgg"])
    assert e.value.code == 2


def test_data_lists_sources(capsys):
    code, out, _ = _run(capsys, "data", "--json")
    assert code == 0 and json.loads(out)["available"]["skimage"].startswith("skimage")


def test_attack_labels_only_resumes_without_recomputing(tmp_path, capsys):
    out_dir = tmp_path / "run"
    argv = ["attack", "--attack", "labels", "--labels", "mixup", "--victims", "4", "--chunk-size", "2",
            "--out", str(out_dir), "--quiet", "--json"]
    code, out, _ = _run(capsys, *argv)
    assert code == 0
    full = json.loads(out)["summary"]
    assert full["victims"] == 4 and full["soft_label_accuracy"] >= 0.75
    first = report.load_records(out_dir)
    # simulate an interruption after the first chunk
    lines = (out_dir / report.RECORDS).read_text().splitlines()
    (out_dir / report.RECORDS).write_text("\n".join(lines[:2]) + "\n")
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "--resume" in err
    code, out, _ = _run(capsys, *argv, "--resume")
    again = report.load_records(out_dir)
    assert code == 0 and len(again) == 4
    assert again[:2] == first[:2]  # kept, not recomputed (same chunk timing)
    for a, b in zip(first, again):
        assert {k: v for k, v in a.items() if k != "chunk_seconds"} == {k: v for k, v in b.items() if k != "chunk_seconds"}
