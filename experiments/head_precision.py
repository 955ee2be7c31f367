"""Why float32 iDLG runs stall above the paper's loss, and what the blocked head changes (docs/reproductions.md, "Accurate head").

For chosen victims of the CIFAR-100 iDLG reproduction (same images, networks
and iDLG starts as ``idlg_reproduction.py --dataset cifar100``, seed 0):

1. iDLG with the dense head (``LeNet(head="dense")``), float32, the paper's
   L-BFGS: where it ends (stalls) is the probe point;
2. at that point, the relative error of the float32 matching gradient against
   float64, with the dense and with the blocked head, and (if torch is
   installed) of the PyTorch reference's float32 gradient; and the largest
   error of the float32 logits against float64 for each;
3. iDLG again from the same start with the blocked head.

    python experiments/head_precision.py --victims 25 27

No GPU or network needed; about 30 s per victim on the 2-core CPU.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxleak import attacks, models, victims
from jaxleak.cli import ScriptOutput, add_output_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _xla import default_data_dir  # noqa: E402
from idlg_reproduction import load_images, victim_image_index  # noqa: E402


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), tree)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _objective(model, params, x, y, dtype):
    """The iDLG matching objective of this victim and its target gradient, both computed in ``dtype``."""
    p, xx, yy = _cast(params, dtype), x.astype(dtype), y.astype(dtype)
    target = victims.gradient(model.apply, p, xx, yy)
    return attacks._objective(model.apply, p, target, attacks.PAPER, yy), target


def _torch_gradient(params, x, label, classes, point):
    """The PyTorch reference's float32 matching gradient at ``point`` (HWC), or None without torch."""
    try:
        import torch
        import torch.nn.functional as F
        import torch_reference
    except ImportError:
        return None
    net = torch_reference.from_flax(jax.tree_util.tree_map(np.asarray, params["params"]), x.shape[-1], classes)
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(2, 0, 1)))[None]
    target = torch_reference.target_gradient(net, nchw(x), label)
    d = nchw(point).requires_grad_(True)
    torch_reference.gradient_distance(net, target, d, lambda out: F.cross_entropy(out, torch.tensor([label]))).backward()
    return d.grad[0].permute(1, 2, 0).numpy()


def probe(i: int, images, labels, classes: int) -> dict:
    key = jax.random.PRNGKey(0)
    j = victim_image_index(0, i, len(images))
    x = jnp.asarray(images[j], jnp.float32) / 255.0
    label = int(labels[j])
    y = jax.nn.one_hot(label, classes)
    heads = {h: models.LeNet(classes, head=h) for h in ("dense", "blocked")}
    template = heads["dense"].init(jax.random.PRNGKey(0), x[None])
    params = {"params": models.init_uniform(template["params"], jax.random.fold_in(jax.random.fold_in(key, 0), i))}
    start = jax.random.fold_in(jax.random.fold_in(key, 2), i)  # the reproduction's iDLG key of victim i
    out, objectives, ends = {"victim": i}, {}, {}
    for name, model in heads.items():
        objectives[name], target = _objective(model, params, x, y, jnp.float32)
        res = jax.jit(lambda k: attacks.idlg(k, model.apply, params, target, x.shape, config=attacks.PAPER))(start)
        out[name] = {"mse": float(jnp.mean((res.x - x) ** 2)), "loss": float(res.loss), "steps": int(res.steps),
                     "evals": int(res.evals)}
        ends[name] = np.asarray(res.x)
    point = ends["dense"]
    with jax.enable_x64(True):
        objective64 = _objective(heads["dense"], params, x, y, jnp.float64)[0]
        reference = jax.grad(lambda a: objective64({"x": a}))(jnp.asarray(point, jnp.float64))
        logits64 = heads["dense"].apply(_cast(params, jnp.float64), jnp.asarray(point, jnp.float64)[None])[0]
        for name, model in heads.items():
            g32 = jax.grad(lambda a: objectives[name]({"x": a}))(jnp.asarray(point))
            out[name]["gradient_error_at_stall"] = _rel(g32, reference)
            out[name]["logit_error_at_stall"] = float(jnp.max(jnp.abs(model.apply(params, jnp.asarray(point)[None])[0] - logits64)))
        tg = _torch_gradient(params, np.asarray(x), label, classes, point)
        out["torch_gradient_error_at_stall"] = None if tg is None else _rel(tg, reference)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--victims", type=int, nargs="+", default=[25, 27], help="victim indices of the CIFAR-100 reproduction")
    p.add_argument("--data", type=pathlib.Path, default=None, help="folder of the .npz subsets (default $JAXLEAK_DATA)")
    add_output_flags(p)
    args = p.parse_args(argv)
    o = ScriptOutput(args)
    data_dir = args.data or default_data_dir()
    if not (data_dir / "cifar100_subset.npz").is_file():
        p.error(f"cifar100_subset.npz not found in {data_dir}: pass --data or set JAXLEAK_DATA")
    images, labels, classes = load_images(data_dir, "cifar100")
    rows = []
    for i in args.victims:
        r = probe(i, images, labels, classes)
        rows.append(r)
        tg = r["torch_gradient_error_at_stall"]
        o.report(f"victim {i}: gradient error at the dense run's end (loss {r['dense']['loss']:.2e}): dense "
                 f"{r['dense']['gradient_error_at_stall']:.3f}, blocked {r['blocked']['gradient_error_at_stall']:.3f}"
                 + ("" if tg is None else f", torch {tg:.3f}")
                 + f"; logit error {r['dense']['logit_error_at_stall']:.1e} / {r['blocked']['logit_error_at_stall']:.1e}; "
                 f"iDLG MSE dense {r['dense']['mse']:.2e}, blocked {r['blocked']['mse']:.2e} (loss {r['blocked']['loss']:.2e})")
    o.summary({"experiment": "head_precision", "victims": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
