"""An independent PyTorch implementation of the iDLG protocol, the benchmark's reference.

Written from ALGORITHMS.md §2-§3 (not from jaxleak): LeNet-Zhu with sigmoid,
the shared gradient of CE with the hard label, then DLG (image + label logits)
or iDLG (label = argmin of the last weight-gradient row sums, image only),
``torch.optim.LBFGS(lr=1)`` for 300 outer steps with the loss re-evaluated
after every step and a stop when it is below 1e-6 (tested every 10 steps).

The network takes its weights from a jaxleak/flax LeNet (``from_flax``) so that
both implementations attack exactly the same victims. Needs the optional
``bench`` extra (``pip install torch==2.13.0``).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F


class TorchLeNet(torch.nn.Module):
    """LeNet-Zhu (ALGORITHMS.md §2.5). Flattens in NHWC order to match the flax model's ``head`` rows."""

    def __init__(self, channels: int, hidden: int, num_classes: int):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(channels, 12, 5, padding=2, stride=2), torch.nn.Sigmoid(),
            torch.nn.Conv2d(12, 12, 5, padding=2, stride=2), torch.nn.Sigmoid(),
            torch.nn.Conv2d(12, 12, 5, padding=2, stride=1), torch.nn.Sigmoid(),
        )
        self.fc = torch.nn.Linear(hidden, num_classes)

    def forward(self, x):
        h = self.body(x)
        return self.fc(h.permute(0, 2, 3, 1).reshape(h.shape[0], -1))


def from_flax(params: dict, channels: int, num_classes: int) -> TorchLeNet:
    """A :class:`TorchLeNet` carrying one flax LeNet's ``params`` (conv HWIO -> OIHW, Dense (d, K) -> (K, d))."""
    hidden = np.asarray(params["head"]["kernel"]).shape[0]
    net = TorchLeNet(channels, hidden, num_classes)
    with torch.no_grad():
        for i, conv in enumerate(net.body[::2]):
            conv.weight.copy_(torch.from_numpy(np.asarray(params[f"conv{i + 1}"]["kernel"]).transpose(3, 2, 0, 1).copy()))
            conv.bias.copy_(torch.from_numpy(np.array(params[f"conv{i + 1}"]["bias"])))
        net.fc.weight.copy_(torch.from_numpy(np.asarray(params["head"]["kernel"]).T.copy()))
        net.fc.bias.copy_(torch.from_numpy(np.array(params["head"]["bias"])))
    return net


def target_gradient(net: TorchLeNet, x_nchw: torch.Tensor, label: int) -> list:
    """The shared gradient of one example: ``grad_theta CE(net(x), label)``, detached, one tensor per parameter."""
    return [g.detach() for g in torch.autograd.grad(F.cross_entropy(net(x_nchw), torch.tensor([label])), list(net.parameters()))]


def gradient_distance(net: TorchLeNet, target: list, dummy: torch.Tensor, dummy_loss) -> torch.Tensor:
    """The DLG objective ``sum_l |grad_theta dummy_loss(net(dummy)) - target_l|^2``, differentiable in ``dummy``."""
    grads = torch.autograd.grad(dummy_loss(net(dummy)), list(net.parameters()), create_graph=True)
    return sum(((a - b) ** 2).sum() for a, b in zip(grads, target))


def attack(net: TorchLeNet, x_hwc: np.ndarray, label: int, method: str, seed: int = 0, iterations: int = 300,
           check_every: int = 10, x0: np.ndarray | None = None) -> dict:
    """One DLG or iDLG run on one victim; returns the final MSE, the label, steps, evaluations and seconds.

    ``x0`` (H, W, C): start the dummy image there instead of at ``torch.randn`` (the benchmark's paired mode,
    where both implementations start each victim from the same point).
    """
    torch.manual_seed(seed)
    gt = torch.from_numpy(np.ascontiguousarray(x_hwc.transpose(2, 0, 1)))[None].float()
    target = target_gradient(net, gt, label)
    num_classes = net.fc.out_features
    dummy = torch.randn(gt.shape)  # drawn even when x0 is given, so DLG's label logits below stay the same draw
    if x0 is not None:
        dummy = torch.from_numpy(np.ascontiguousarray(np.asarray(x0, np.float32).transpose(2, 0, 1)))[None]
    dummy = dummy.requires_grad_(True)
    evals = [0]
    if method == "dlg":
        logits = torch.randn((1, num_classes)).requires_grad_(True)
        opt = torch.optim.LBFGS([dummy, logits], lr=1)
        dummy_loss = lambda out: torch.mean(torch.sum(-F.softmax(logits, -1) * F.log_softmax(out, -1), -1))
    else:
        pred_label = torch.argmin(torch.sum(target[-2], dim=-1)).reshape(1)
        opt = torch.optim.LBFGS([dummy], lr=1)
        dummy_loss = lambda out: F.cross_entropy(out, pred_label)

    def closure():
        opt.zero_grad()
        diff = gradient_distance(net, target, dummy, dummy_loss)
        diff.backward()
        evals[0] += 1
        return diff

    t = time.time()
    steps = 0
    for it in range(iterations):
        opt.step(closure)
        current = closure().item()
        steps += 1
        if it % check_every == 0 and current < 1e-6:  # the paper: every iterations // 30 = 10
            break
    seconds = time.time() - t
    label_out = int(torch.argmax(logits)) if method == "dlg" else int(pred_label)
    mse = float(torch.mean((dummy.detach() - gt) ** 2))
    return {"mse": mse, "label": label_out, "loss": current, "steps": steps, "evals": evals[0], "seconds": seconds}


def attack_victim(task: tuple) -> dict:
    """``attack`` on one victim given as plain numpy: ``(params, x_hwc, label, method, seed, iterations[, x0])``.

    A picklable entry point for a pool of worker processes (``bench_attack.py
    --torch-workers``); ``params`` is one flax LeNet's ``params`` dict of numpy arrays.
    """
    params, x_hwc, label, method, seed, iterations, *x0 = task
    num_classes = np.asarray(params["head"]["kernel"]).shape[1]
    net = from_flax(params, x_hwc.shape[-1], num_classes)
    return attack(net, x_hwc, label, method, seed=seed, iterations=iterations, x0=x0[0] if x0 else None)


_start_barrier = None


def single_threaded_worker(barrier=None) -> None:
    """Pool initialiser: one intra-op thread per worker process, so W workers use W cores.

    ``barrier``: a ``multiprocessing`` barrier for W parties, kept for :func:`wait_for_all_workers`.
    """
    global _start_barrier
    torch.set_num_threads(1)
    _start_barrier = barrier


def wait_for_all_workers(_=None) -> None:
    """A warm-up task: blocks until every worker of the pool has started and reached the barrier."""
    _start_barrier.wait()
