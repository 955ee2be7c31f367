"""Gradient-matching attacks: DLG, iDLG, Inverting Gradients and matching with a given (soft) label.

One victim shares ``target_grads = grad_theta CE(f_theta(x), y)`` (a pytree
shaped like ``variables["params"]``). The attacker optimises a dummy image
``x'`` (and for DLG dummy label logits ``v``) so that the dummy gradient
matches it (ALGORITHMS.md §2-§4.9(b)). What is minimised (gradient distances,
the TV prior, the feature term) is ``jaxleak.objectives``; this module owns how:
configurations, optimisation loops, the attacks and the many-victim driver.

* :func:`dlg` (Zhu et al. 2019): ``x'`` and ``v`` jointly, dummy label ``softmax(v)``.
* :func:`idlg` (Zhao et al. 2020): the label is read off the last layer
  (``jaxleak.recovery.idlg_label``, ALGORITHMS.md §3) and held fixed.
* :func:`given_label`: the same loop with a label given by the caller (e.g. a
  soft label recovered by Wang, Liang, He, ICLR 2024).
* :func:`inverting_gradients` (Geiping et al. 2020): cosine distance + TV, Adam.

Every attack is a pure one-victim function ``(key, apply_fn, variables,
target_grads, x_shape, [label], config) -> AttackResult`` that works under
``jit`` and ``vmap``; :func:`attack_victims` maps it over many victims, or,
with ``strategy="stream"``, steps a fixed number of slots of victims one outer
step at a time and refills each slot when its victim's run ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

from jaxleak import lbfgs as _lbfgs
from jaxleak import metrics as _metrics
from jaxleak import models as _models
from jaxleak import objectives as _objectives
from jaxleak import processes as _processes
from jaxleak import recovery as _recovery
from jaxleak import victims as _victims
from jaxleak.recovery._core import _is_concrete, _raise_for_reasons

Array = jax.Array
PyTree = Any
ApplyFn = Callable[..., Any]

#: Fastest way to run many victims' attacks, per backend. CPU, iDLG on LeNet 32x32,
#: 8 victims: a loop of the jitted one-victim attack 0.23 victims/s vs 0.064 under
#: vmap, where every victim runs as long as the slowest (2026-12-03, 2 host devices;
#: ``experiments/bench_attack.py --strategies loop vmap``). With several local
#: devices the loop is dealt round-robin over them.
DEFAULT_STRATEGY = {"cpu": "loop", "gpu": "vmap", "tpu": "vmap"}

#: Smallest head kernel (d * K entries) for which ``AttackConfig.factored_head=None`` factors it.
#: LeNet with K = 100 (76,800 entries): 1.64 vs 1.80 ms per value-and-gradient on one CPU device but
#: no faster on the 2-device victim loop (1.71-1.84 vs 1.77-1.80 ms per evaluation, 8 CIFAR-100
#: victims, 2026-12-03), so small heads keep the dense form and their published trajectories.
FACTORED_HEAD_MIN_SIZE = 2**18

#: The ``jax.vmap`` axis name :func:`attack_victims` maps victims over (``AttackConfig.victim_axis``).
VICTIM_AXIS = "victims"

# --------------------------------------------------------------------------
# Configuration and results
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """How one gradient-matching attack runs. Defaults reproduce DLG/iDLG (ALGORITHMS.md §2.3-§2.4).

    Attributes:
      distance: ``"l2"`` (DLG) or ``"cosine"`` (Inverting Gradients).
      optimizer: ``"torch_lbfgs"`` (PyTorch semantics, the papers'),
        ``"optax_lbfgs"`` (optax's L-BFGS with zoom line search) or ``"adam"``.
      steps: outer steps (``torch.optim.LBFGS.step`` calls, or optimiser updates).
      lbfgs: the PyTorch L-BFGS hyper-parameters.
      lbfgs_milestones: a MultiStep schedule of the PyTorch L-BFGS learning rate
        (``optimizer="torch_lbfgs"`` only), as fractions in (0, 1) of ``steps``
        applied with ``gamma``, the same convention as Adam's ``milestones``.
        PyTorch's ``MultiStepLR`` stepped after every ``optimizer.step()``
        (paper 2's ``l2`` cost: lr 1, x0.1 at steps 112/187/262 of 300,
        ALGORITHMS.md §4.9(b)): outer step ``i`` (0-based) runs with
        ``lbfgs.lr * gamma ** #{m : round(m * steps) <= i}``
        (:func:`lbfgs_learning_rates`); the curvature history persists across
        the change. ``(3/8, 5/8, 7/8)`` gives steps 112/188/262 of 300
        (``187 / 300`` for the paper's exact second one). ``()`` (default): a
        constant ``lbfgs.lr``, as DLG/iDLG.
      memory_size: optax L-BFGS history.
      lr, milestones, gamma: Adam's step size and its MultiStep schedule
        (milestones as fractions of ``steps``, at step ``round(m * steps)``; IG:
        it/2.667, it/1.6, it/1.142). ``gamma`` also scales ``lbfgs_milestones``.
      signed: Adam on the sign of the gradient (Inverting Gradients' option).
      tv: weight of ``jaxleak.objectives.total_variation``.
      box: clamp ``x'`` to ``(lo, hi)`` after every Adam update (``None``: no box).
      stop_loss, check_every: stop a victim when its matching loss is below
        ``stop_loss``, tested every ``check_every`` steps (iDLG: 1e-6 every 10).
      give_up: ``(step, loss)``: abandon a victim whose matching loss is still at or above
        ``loss`` at a check (every ``check_every`` steps, as for ``stop_loss``) after outer
        step ``step`` or later, as a hopeless run: it stops like a converged one, with ``steps < config.steps``
        and its loss above ``stop_loss`` (:func:`gave_up`). Not in the papers; ``None`` (default):
        every victim runs until it converges or ``steps`` are spent.
      stall: ``(loss, ratio)``: stop a victim whose matching loss, at a check (every ``check_every``
        steps, from the second on), is below ``loss`` and not below ``ratio`` times the loss the
        previous check saw: a run already near the match that no longer makes progress (less than a
        ``1/ratio``-fold fall over ``check_every`` steps). It stops like a converged one, with
        ``steps < config.steps`` and its loss at or above ``stop_loss`` (:func:`stalled`); ``loss``
        must lie above ``stop_loss`` and, with ``give_up``, at or below its loss, so the two rules
        stop different victims. Not in the papers; ``None`` (default): no such stop.
      retries: with ``give_up``, start an abandoned victim again from a fresh random start
        (the key folded with the try's number; the first try is the run without retries), up
        to this many more times. The result is the last try's, with ``evals`` summed over all.
      exclude_tensors: gradient tensors left out of the distance (paths like ``"head/kernel"``).
      restarts: independent random initialisations; the lowest final loss wins.
      snapshot_every: keep ``x'`` every this many steps (Figure 2 of iDLG).
      precision: matmul/convolution precision inside the attack (``jax.default_matmul_precision``).
        ``"highest"`` keeps full float32: on GPUs the default lets XLA use TF32
        (10-bit mantissa), and gradient matching then stalls far from the
        optimum (measured on an H100: iDLG on MNIST 37 % of victims below MSE
        1e-3 with the default, vs 87 % on CPU). ``None`` leaves the backend's default.
      feature_weight: weight ``f_s`` of a feature-matching term on the last-layer
        input ``h(x')`` against a recovered feature ``h_hat`` (paper 2's ``f``/``gf``
        variants, ALGORITHMS.md §4.9(b)): ``f_s ||h(x') - h_hat||^2`` with
        ``distance="l2"``, ``f_s (1 - cos(h(x'), h_hat))`` with ``"cosine"``. Needs
        the ``feature`` argument of :func:`given_label`; 0 (default) adds nothing.
      victim_axis: the ``jax.vmap`` axis name the attack is mapped over, if any. Then the
        optimisation loops run while any victim on that axis runs and mask the finished ones
        themselves (``jaxleak.lbfgs.any_running``), instead of leaving it to ``vmap``'s
        batching of ``while_loop``, which selects every loop carry — the L-BFGS history
        included — between old and new on every iteration. Same results. Set by
        :func:`attack_victims` for its ``"vmap"`` and ``"stream"`` strategies; set it yourself
        only when you call ``jax.vmap(..., axis_name=victim_axis)`` yourself (an unmapped call
        with an axis name fails with an unbound axis name error). ``None`` (default): no axis.
      factored_head: compute the last layer's kernel gradient ``h a^T`` in factored form
        (``jaxleak.objectives.gradient_distance``): the same objective and gradient (to
        rounding) without forming the ``(d, K)`` dummy gradient, which dominates with many
        classes (LeNet's value-and-gradient on the CPU: 8.4 vs 86.5 ms with LFW's 5,749
        classes, 2.96 vs 6.08 ms with 1,000). Needs a model that follows ``jaxleak.models``'
        last layer convention (a dense ``"head"`` fed by the ``h`` of ``return_feature=True``).
        ``None`` (default): on when ``apply_fn`` is one of ``jaxleak.models``' networks
        (:func:`jaxleak.models.follows_head_convention`) and the head kernel has at least
        :data:`FACTORED_HEAD_MIN_SIZE` entries.
    """

    distance: str = "l2"
    optimizer: str = "torch_lbfgs"
    steps: int = 300
    lbfgs: _lbfgs.TorchLBFGSConfig = _lbfgs.TorchLBFGSConfig()
    memory_size: int = 100
    lr: float = 0.1
    milestones: tuple[float, ...] = (3 / 8, 5 / 8, 7 / 8)
    gamma: float = 0.1
    signed: bool = False
    tv: float = 0.0
    box: Optional[tuple[float, float]] = None
    stop_loss: float = 1e-6
    check_every: int = 10
    exclude_tensors: tuple[str, ...] = ()
    restarts: int = 1
    snapshot_every: int = 10
    precision: Optional[str] = "highest"
    feature_weight: float = 0.0
    lbfgs_milestones: tuple[float, ...] = ()
    factored_head: Optional[bool] = None
    victim_axis: Optional[str] = None
    give_up: Optional[tuple[int, float]] = None
    retries: int = 0
    stall: Optional[tuple[float, float]] = None

    def __post_init__(self):
        if self.precision not in (None, "default", "high", "highest", "bfloat16", "tensorfloat32", "float32"):
            raise ValueError(f"precision must be None or a jax.default_matmul_precision name, got {self.precision!r}")
        if self.distance not in _objectives.DISTANCES:
            raise ValueError(f"distance must be one of {sorted(_objectives.DISTANCES)}, got {self.distance!r}")
        if self.optimizer not in ("torch_lbfgs", "optax_lbfgs", "adam"):
            raise ValueError(f"optimizer must be 'torch_lbfgs', 'optax_lbfgs' or 'adam', got {self.optimizer!r}")
        for name in ("steps", "check_every", "restarts", "snapshot_every", "memory_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.box is not None and not self.box[0] < self.box[1]:
            raise ValueError(f"box must be (lo, hi) with lo < hi, got {self.box}")
        if not self.feature_weight >= 0:
            raise ValueError(f"feature_weight must be >= 0, got {self.feature_weight}")
        if not all(0 < m < 1 for m in self.lbfgs_milestones):
            raise ValueError(f"lbfgs_milestones must be fractions of steps in (0, 1), got {self.lbfgs_milestones}")
        if self.lbfgs_milestones and self.optimizer != "torch_lbfgs":
            raise ValueError(f"lbfgs_milestones schedule optimizer='torch_lbfgs' only, got optimizer={self.optimizer!r}")
        if self.lbfgs_milestones and not self.gamma > 0:
            raise ValueError(f"gamma must be > 0 with lbfgs_milestones, got {self.gamma}")
        if self.give_up is not None and not (len(self.give_up) == 2 and 0 <= self.give_up[0] < self.steps
                                             and self.give_up[1] > self.stop_loss):
            raise ValueError(f"give_up must be (step, loss) with 0 <= step < steps ({self.steps}) and loss > "
                             f"stop_loss ({self.stop_loss}), got {self.give_up}")
        if self.stall is not None and not (len(self.stall) == 2 and self.stall[0] > self.stop_loss
                                           and 0 < self.stall[1] <= 1):
            raise ValueError(f"stall must be (loss, ratio) with loss > stop_loss ({self.stop_loss}) and 0 < ratio <= 1, "
                             f"got {self.stall}")
        if self.stall is not None and self.give_up is not None and not self.stall[0] <= self.give_up[1]:
            raise ValueError(f"stall's loss ({self.stall[0]}) must not exceed give_up's ({self.give_up[1]}): a run "
                             "stopped by one rule must not look stopped by the other")
        if self.retries < 0 or (self.retries and self.give_up is None):
            raise ValueError(f"retries must be >= 0 and needs give_up (it retries abandoned victims), got "
                             f"retries={self.retries}, give_up={self.give_up}")


#: DLG/iDLG as published: L2, PyTorch L-BFGS(lr 1), 300 steps, stop at 1e-6 (checked every 10).
PAPER = AttackConfig()
#: optax's L-BFGS with a zoom line search, 3,000 steps (JAX_NOTES.md: 4/4 victims at MSE < 1e-4).
OPTAX_LBFGS = AttackConfig(optimizer="optax_lbfgs", steps=3000)
#: Inverting Gradients as in paper 2's code: cosine + TV 1e-2, Adam lr 0.1, 4,800 steps, MultiStep x0.1.
INVERTING_GRADIENTS = AttackConfig(distance="cosine", optimizer="adam", steps=4800, lr=0.1, tv=1e-2, stop_loss=0.0)
#: PAPER plus giving up a run still at loss >= 1 after step 80 and trying it again from a fresh start, twice at most
#: (``experiments/give_up_study.py`` chose the rule on 128 MNIST and 128 CIFAR-100 victims: it abandoned no iDLG run
#: that would have recovered the image, and 1 of 189 such DLG runs). Not the papers' protocol. iDLG below MSE 1e-3 on victims the study did not see:
#: 98.4 % of 1,000 MNIST victims (PAPER 88.8 %) with 30 % fewer evaluations per recovered victim, 98.8 % of 256
#: CIFAR-100 victims of seed 1 (PAPER 82.0 %).
PAPER_RETRIES = dataclasses.replace(PAPER, give_up=(80, 1.0), retries=2)
#: PAPER_RETRIES plus stopping a run whose loss is below 1e-5 and fell by less than 10 % over the last 10 steps
#: (chosen with ``experiments/give_up_study.py`` on the same 128 + 128 victims). On 256 CIFAR-100 victims of seed 1,
#: which the choice did not see: 7.5 % fewer DLG evaluations and 1 % fewer iDLG ones (the stalled runs' late steps are
#: cheap), the same victims below MSE 1e-3, 2 DLG victims above 1e-4 and 1 iDLG victim above 5e-4 that PAPER_RETRIES
#: takes below. On MNIST, whose runs converge early, next to no change. Not the papers' protocol; an option, not the
#: recommended default.
PAPER_RETRIES_STALL = dataclasses.replace(PAPER_RETRIES, stall=(1e-5, 0.9))


class AttackResult(NamedTuple):
    """One victim's reconstruction.

    ``x`` ``(H, W, C)``; ``label`` ``(K,)`` the label used (DLG: ``softmax(v)``);
    ``loss`` the final objective; ``loss_history`` ``(steps,)`` the objective
    after each outer step (NaN after an early stop); ``steps`` outer steps run;
    ``evals`` objective evaluations; ``snapshots`` ``(steps // snapshot_every + 1, H, W, C)``
    ``x'`` before steps 0, e, 2e, ... (repeats the last once stopped).
    """

    x: Array
    label: Array
    loss: Array
    loss_history: Array
    steps: Array
    evals: Array
    snapshots: Array


# --------------------------------------------------------------------------
# The optimisation loops: z is a pytree {"x": (H, W, C), ["v": (K,)]}
# --------------------------------------------------------------------------


def lbfgs_learning_rates(config: AttackConfig) -> np.ndarray:
    """The learning rate of each outer PyTorch L-BFGS step, ``(steps,)`` float64.

    ``torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma)`` with
    ``scheduler.step()`` after every ``opt.step(closure)``, as in paper 2's
    reconstruction loop (ALGORITHMS.md §4.9(b)): at outer step ``i`` (0-based)
    the scheduler has stepped ``i`` times, so the lr is ``lbfgs.lr`` times
    ``gamma`` once per milestone ``round(m * steps) <= i`` (``m`` in
    ``lbfgs_milestones``), multiplied in as PyTorch does. Constant without milestones.
    """
    lr = np.full(config.steps, config.lbfgs.lr, np.float64)
    for m in config.lbfgs_milestones:
        lr[int(round(m * config.steps)):] *= config.gamma
    return lr


def _snapshot_slots(config: AttackConfig) -> int:
    return config.steps // config.snapshot_every + 1


def _stops(i: Array, loss: Array, hist: Array, live: Array, config: AttackConfig) -> Array:
    """Whether a live victim stops before outer step ``i``: the check after step ``i - 1`` (every
    ``check_every``) finds its loss below ``stop_loss``, or, with ``give_up``, still at or above its threshold,
    or, with ``stall``, below its loss and not below ``ratio`` times the previous check's (``hist``: the loss
    after each step so far)."""
    check = live & (i > 0) & ((i - 1) % config.check_every == 0)
    stop = loss < config.stop_loss
    if config.give_up is not None:
        step, threshold = config.give_up
        stop = stop | ((i - 1 >= step) & ~(loss < threshold))  # NaN gives up too
    if config.stall is not None:
        ceiling, ratio = config.stall
        previous = hist[jnp.maximum(i - 1 - config.check_every, 0)]
        stop = stop | ((i - 1 >= config.check_every) & (loss < ceiling) & ~(loss < ratio * previous))
    return check & stop


def _finish(objective, z, hist, i, evals, snaps, config) -> tuple:
    loss = objective(z)
    # A victim stopped at a check keeps the loss the check saw there (gave_up reads it); else the last step's.
    j = jnp.maximum(i - 1, 0)
    hist = hist.at[j].set(jnp.where((i > 0) & jnp.isnan(hist[j]), loss, hist[j]))
    slots = jnp.arange(snaps.shape[0])
    snaps = jnp.where((slots * config.snapshot_every >= i)[:, None, None, None], z["x"][None], snaps)
    return z, loss, hist, i, evals + 1, snaps


class _Loop(NamedTuple):
    """An optimisation run as a machine that can be stepped from outside: ``init(z0, active)`` (the carry),
    ``running(carry)`` (per victim), ``step(carry)`` (one outer step; a victim not running keeps its carry) and
    ``finish(carry)`` (``_finish``'s tuple). :func:`_optimise` runs it to the end in one ``while_loop``; the
    ``"stream"`` driver (:func:`attack_victims`) steps slots of victims and refills the finished ones."""

    init: Callable[..., tuple]
    running: Callable[[tuple], Array]
    step: Callable[[tuple], tuple]
    finish: Callable[[tuple], tuple]


def _torch_lbfgs_loop(objective: Callable[[PyTree], Array], z0: PyTree, config: AttackConfig) -> _Loop:
    """The PyTorch-semantics L-BFGS run (``z0``: its start's structure and dtype)."""
    flat0, unravel = ravel_pytree(z0)
    vg = jax.value_and_grad(lambda f: objective(unravel(f)))
    cfg = config.lbfgs
    # None keeps the constant cfg.lr (the unscheduled program, unchanged); else one lr per outer step.
    lrs = jnp.asarray(lbfgs_learning_rates(config), flat0.dtype) if config.lbfgs_milestones else None
    axis = config.victim_axis

    def init(z, active=True):
        flat = ravel_pytree(z)[0]
        hist0 = jnp.full((config.steps,), jnp.nan, flat.dtype)
        snaps0 = jnp.zeros((_snapshot_slots(config), *z["x"].shape), flat.dtype)
        return jnp.zeros((), jnp.int32), _lbfgs.init(flat, cfg), ~jnp.asarray(active), hist0, snaps0

    def running(c):
        return (c[0] < config.steps) & ~c[2]

    def step(c):
        i, state, done, hist, snaps = c
        # False only for a finished victim while others on the victim axis run: it keeps its carry.
        live = (i < config.steps) & ~done
        loss, g = vg(state.x)  # the loss after step i-1 and the first closure call of step i
        j = jnp.maximum(i - 1, 0)
        hist = hist.at[j].set(jnp.where(live & (i > 0), loss, hist[j]))
        stopped = _stops(i, loss, hist, live, config)
        # Row writes masked in place rather than lax.cond, which vmap turns into selects over the
        # whole buffer (here the snapshots; in the L-BFGS update the (m, n) history).
        slot = jnp.minimum(i // config.snapshot_every, snaps.shape[0] - 1)
        take = live & (i % config.snapshot_every == 0)
        snaps = snaps.at[slot].set(jnp.where(take, unravel(state.x)["x"], snaps[slot]))
        lr = None if lrs is None else lrs[jnp.minimum(i, config.steps - 1)]
        state = _lbfgs.update(state, vg, cfg, loss, g, lr, active=live & ~stopped, axis_name=axis)[0]
        return jnp.where(live & ~stopped, i + 1, i), state, done | stopped, hist, snaps

    def finish(c):
        i, state, done, hist, snaps = c
        return _finish(objective, unravel(state.x), hist, i, state.func_evals + done.astype(jnp.int32), snaps, config)

    return _Loop(init, running, step, finish)


def _first_order_loop(objective: Callable[[PyTree], Array], z0: PyTree, config: AttackConfig) -> _Loop:
    """optax L-BFGS (zoom line search) or Adam, with the same early stop and snapshots."""
    del z0  # the carry holds z itself
    if config.optimizer == "optax_lbfgs":
        opt = optax.lbfgs(memory_size=config.memory_size)
    else:
        schedule = optax.piecewise_constant_schedule(
            config.lr, {int(round(f * config.steps)): config.gamma for f in config.milestones}
        )
        opt = optax.chain(optax.scale_by_sign() if config.signed else optax.identity(), optax.adam(schedule))
    vg = optax.value_and_grad_from_state(objective) if config.optimizer == "optax_lbfgs" else jax.value_and_grad(objective)

    def init(z, active=True):
        hist0 = jnp.full((config.steps,), jnp.nan, z["x"].dtype)
        snaps0 = jnp.zeros((_snapshot_slots(config), *z["x"].shape), z["x"].dtype)
        return jnp.zeros((), jnp.int32), z, opt.init(z), ~jnp.asarray(active), hist0, jnp.zeros((), jnp.int32), snaps0

    def running(c):
        return (c[0] < config.steps) & ~c[3]

    def step(c):
        i, z, state, done, hist, evals, snaps = c
        live = (i < config.steps) & ~done  # as in _torch_lbfgs_loop
        if config.optimizer == "optax_lbfgs":
            loss, g = vg(z, state=state)
        else:
            loss, g = vg(z)
        j = jnp.maximum(i - 1, 0)
        hist = hist.at[j].set(jnp.where(live & (i > 0), loss, hist[j]))
        stopped = _stops(i, loss, hist, live, config)
        slot = jnp.minimum(i // config.snapshot_every, snaps.shape[0] - 1)
        snaps = snaps.at[slot].set(jnp.where(live & (i % config.snapshot_every == 0), z["x"], snaps[slot]))
        if config.optimizer == "optax_lbfgs":
            updates, new_state = opt.update(g, state, z, value=loss, grad=g, value_fn=objective)
            # vg evaluated only when the state held no finite value (the first step); the zoom line
            # search evaluated value-and-gradient once per trial step size.
            n = (~jnp.isfinite(optax.tree.get(state, "value"))).astype(jnp.int32)
            n = n + jnp.asarray(optax.tree.get(new_state, "num_linesearch_steps"), jnp.int32)
        else:
            updates, new_state = opt.update(g, state, z)
            n = 1
        new_z = optax.apply_updates(z, updates)
        if config.box is not None:
            new_z = {**new_z, "x": jnp.clip(new_z["x"], *config.box)}
        stay = stopped | ~live
        keep = lambda a, b: jax.tree_util.tree_map(lambda u, w: jnp.where(stay, u, w), a, b)
        return (jnp.where(stay, i, i + 1), keep(z, new_z), keep(state, new_state), done | stopped, hist,
                evals + jnp.where(live, n, 0), snaps)

    def finish(c):
        i, z, _, _, hist, evals, snaps = c
        return _finish(objective, z, hist, i, evals, snaps, config)

    return _Loop(init, running, step, finish)


def _loop(objective: Callable[[PyTree], Array], z0: PyTree, config: AttackConfig) -> _Loop:
    return (_torch_lbfgs_loop if config.optimizer == "torch_lbfgs" else _first_order_loop)(objective, z0, config)


def _optimise(objective: Callable[[PyTree], Array], z0: PyTree, config: AttackConfig, active: Array = True):
    """Runs ``config``'s optimiser from ``z0``; ``active`` False (a victim with nothing left to do, under
    vmap while others run) starts it finished, so it takes no step."""
    with _precision(config):  # applies to everything traced inside
        loop = _loop(objective, z0, config)
        c = lax.while_loop(lambda c: _lbfgs.any_running(loop.running(c), config.victim_axis), loop.step,
                           loop.init(z0, active))
        return loop.finish(c)


def _precision(config: AttackConfig):
    """``jax.default_matmul_precision(config.precision)``, or nothing with ``None``."""
    return contextlib.nullcontext() if config.precision is None else jax.default_matmul_precision(config.precision)


# --------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------


def _params(variables: PyTree) -> PyTree:
    return variables["params"] if isinstance(variables, dict) and "params" in variables else variables


def _check_one_example(kernel_grad: Array, what: str) -> None:
    """Raises ``ValueError`` unless the last-layer kernel gradient(s) can be one example's (rank 1, non-zero).

    Every attack here reconstructs one image from one example's gradient; a batch's
    gradient (rank > 1) or an all-zero one would be matched silently and wrongly. A
    defended gradient (noised, pruned, quantised) is not rank 1 either: callers that mean
    to attack one turn this check off (``require_one_example=False`` of the attacks and of
    :func:`attack_victims`).
    ``kernel_grad`` ``(d, K)`` or ``(V, d, K)``; other layouts are not checked.
    """
    if jnp.ndim(kernel_grad) in (2, 3):
        with jax.ensure_compile_time_eval():  # concrete inputs, even while an outer jit traces the caller
            reason = _recovery.gradient_reason(kernel_grad)
        _raise_for_reasons(reason, f"{what}: the last layer's kernel gradient cannot be one example's")


def check_inputs(variables: PyTree, target_grads: PyTree, x_shape: Sequence[int], label: Optional[Array] = None,
                 *, require_one_example: bool = True) -> int:
    """Raises ``ValueError`` on a target gradient that does not fit the model, a bad ``x_shape`` or label.

    Shapes and tree structures are static and always checked; NaN/Inf in
    ``target_grads``, and with ``require_one_example`` that its last-layer kernel gradient
    can be one example's (rank 1, not all zero: ``jaxleak.recovery.gradient_reason``),
    when the arrays are concrete (outside ``jit``; ``attack_victims`` checks its stacked
    inputs itself). Returns the number of classes K.
    """
    params = _params(variables)
    p_struct, g_struct = jax.tree_util.tree_structure(params), jax.tree_util.tree_structure(target_grads)
    if p_struct != g_struct:
        raise ValueError(
            f"target_grads must have the structure of variables['params'] ({p_struct}), got {g_struct}"
        )
    bad = [
        (_objectives.tensor_name(p), tuple(g.shape), tuple(w.shape))
        for (p, g), w in zip(jax.tree_util.tree_flatten_with_path(target_grads)[0], jax.tree_util.tree_leaves(params))
        if tuple(g.shape) != tuple(w.shape)
    ]
    if bad:
        raise ValueError(f"target_grads shapes differ from the params' (name, grad shape, param shape): {bad}")
    if len(tuple(x_shape)) != 3:
        raise ValueError(f"x_shape must be one image's (H, W, C), got {tuple(x_shape)}")
    leaves = jax.tree_util.tree_leaves(target_grads)
    if _is_concrete(*leaves):
        nonfinite = [_objectives.tensor_name(p) for p, g in jax.tree_util.tree_flatten_with_path(target_grads)[0]
                     if not np.all(np.isfinite(np.asarray(g)))]
        if nonfinite:
            raise ValueError(f"target_grads contains NaN or Inf in {nonfinite}")
        if require_one_example:
            _check_one_example(_models.last_layer(target_grads)[0], "target_grads")
    kernel, _ = _models.last_layer(params)
    k = kernel.shape[-1]
    if label is not None and jnp.shape(label) != (k,):
        raise ValueError(f"label must be a distribution of shape ({k},) for this model, got shape {jnp.shape(label)}")
    return k


# --------------------------------------------------------------------------
# One-victim attacks
# --------------------------------------------------------------------------


def _objective(apply_fn, variables, target_grads, config: AttackConfig, label: Optional[Array],
               feature: Optional[Array] = None) -> Callable[[PyTree], Array]:
    """``jaxleak.objectives.matching_objective`` with ``config``'s distance, TV, excluded tensors, feature weight and head."""
    factored = config.factored_head
    if factored is None:
        kernel = _models.last_layer(variables)[0]
        factored = _models.follows_head_convention(apply_fn) and kernel.size >= FACTORED_HEAD_MIN_SIZE
    return _objectives.matching_objective(
        apply_fn, variables, target_grads, label, feature, distance=config.distance, tv=config.tv,
        exclude_tensors=config.exclude_tensors, feature_weight=config.feature_weight, factored_head=factored,
    )


def gave_up(result: AttackResult, config: AttackConfig) -> Array:
    """Whether ``config.give_up`` abandoned the run: stopped before ``config.steps``, its loss not below ``give_up``'s.

    Reads the loss the stopping check saw (``result.loss_history[steps - 1]``), so a run that
    converged is never counted, whatever the rounding of the final ``result.loss``; nor is one
    that ``config.stall`` stopped, whose loss lies below ``give_up``'s. Always false without
    ``give_up``. Takes one result or a stacked one (a leading victim axis); jit- and vmap-compatible.
    """
    if config.give_up is None:
        return jnp.zeros(jnp.shape(result.steps), bool)
    early, last = _stopped_at_a_check(result, config)
    return early & ~(last < config.give_up[1])


def stalled(result: AttackResult, config: AttackConfig) -> Array:
    """Whether ``config.stall`` stopped the run: before ``config.steps``, its loss at or above ``stop_loss``
    and below the stall rule's. Always false without ``stall``. Takes one result or a stacked one; jit- and
    vmap-compatible."""
    if config.stall is None:
        return jnp.zeros(jnp.shape(result.steps), bool)
    early, last = _stopped_at_a_check(result, config)
    return early & ~(last < config.stop_loss) & (last < config.stall[0])


def _stopped_at_a_check(result: AttackResult, config: AttackConfig) -> tuple[Array, Array]:
    """Whether the run stopped at a check before ``config.steps``, and the loss that check saw
    (``loss_history[steps - 1]``); one result or a stacked one."""
    last = jnp.take_along_axis(result.loss_history,
                               jnp.clip(result.steps - 1, 0, result.loss_history.shape[-1] - 1)[..., None], axis=-1)[..., 0]
    return (result.steps > 0) & (result.steps < config.steps), last


def keep_best(result: AttackResult, snapshot_every: int) -> tuple[Array, Array]:
    """The iterate with the lowest finite objective: the final ``x'`` or a snapshot (paper 2's keep-best).

    Wang, Liang, He's reconstruction code keeps, within each run, the iterate of
    lowest objective (ALGORITHMS.md §4.9(b)); here the candidates are the final
    ``x'`` and the snapshots after steps ``e-1, 2e-1, ...`` (``e = snapshot_every``
    of the run's :class:`AttackConfig`), scored by ``loss_history``. A run that
    diverged to NaN thus returns its last good iterate. Returns ``(x, loss)``;
    ``loss`` is ``inf`` when no candidate is finite. Jit- and vmap-compatible.
    """
    hist = result.loss_history
    idx = jnp.arange(1, result.snapshots.shape[0]) * snapshot_every - 1
    snap = jnp.where(idx < hist.shape[0], hist[jnp.clip(idx, 0, hist.shape[0] - 1)], jnp.inf)
    finite_x = jax.vmap(lambda a: jnp.all(jnp.isfinite(a)))(result.snapshots[1:])
    snap = jnp.where(jnp.isfinite(snap) & finite_x, snap, jnp.inf)
    final = jnp.where(jnp.isfinite(result.loss) & jnp.all(jnp.isfinite(result.x)), result.loss, jnp.inf)
    losses = jnp.concatenate([final[None], snap])
    i = jnp.argmin(losses)  # ties keep the final iterate
    return jnp.concatenate([result.x[None], result.snapshots[1:]])[i], losses[i]


def _tries_again(t: Array, result: AttackResult, config: AttackConfig) -> Array:
    """Whether try ``t`` (from 1), which gave ``result``, is followed by another: ``config.give_up`` abandoned it and
    fewer than ``config.retries`` retries were made. The next try starts from ``jax.random.fold_in(key, t)``."""
    return (t <= config.retries) & gave_up(result, config)


def _best_restart(outs: tuple, axis: int = 0) -> tuple:
    """``outs`` (``AttackResult``'s fields) at the restart with the lowest finite final loss (field 2) along
    ``axis``, which is dropped."""
    loss = outs[2]
    best = jnp.argmin(jnp.where(jnp.isfinite(loss), loss, jnp.inf), axis=axis, keepdims=True)
    return tuple(jnp.take_along_axis(o, best.reshape(best.shape + (1,) * (o.ndim - best.ndim)), axis=axis).squeeze(axis)
                 for o in outs)


def _with_retries(run_one: Callable[..., tuple], config: AttackConfig) -> Callable[[Array], tuple]:
    """``run_one`` tried again from a fresh start while ``config.give_up`` abandons it, at most ``config.retries`` times."""
    if not config.retries:
        return run_one

    def run(key):
        first = run_one(key)

        def cond(c):
            t, out = c
            return _lbfgs.any_running(_tries_again(t, AttackResult(*out), config), config.victim_axis)

        def body(c):
            t, out = c
            again = _tries_again(t, AttackResult(*out), config)
            new = run_one(jax.random.fold_in(key, t), active=again)
            new = new[:5] + (new[5] + out[5],) + new[6:]  # evaluations summed over the tries
            return t + 1, jax.tree_util.tree_map(lambda a, b: jnp.where(again, a, b), new, out)

        return lax.while_loop(cond, body, (jnp.ones((), jnp.int32), first))[1]

    return run


def _with_restarts(run_one: Callable[..., tuple], key: Array, config: AttackConfig) -> AttackResult:
    run_one = _with_retries(run_one, config)
    if config.restarts == 1:
        out = run_one(key)
        return AttackResult(*out)
    return AttackResult(*_best_restart(jax.vmap(run_one)(jax.random.split(key, config.restarts))))


class _Problem(NamedTuple):
    """One victim's matching problem: the ``objective`` of ``z``, ``start(key) -> z0`` and ``output(z) -> (x, label)``."""

    objective: Callable[[PyTree], Array]
    start: Callable[[Array], PyTree]
    output: Callable[[PyTree], tuple[Array, Array]]


def _solve(problem: _Problem, key: Array, config: AttackConfig) -> AttackResult:
    """Runs ``problem`` from ``key`` with ``config``'s optimiser, retries and restarts."""

    def run_one(k, active=True):
        z, loss, hist, i, evals, snaps = _optimise(problem.objective, problem.start(k), config, active)
        return (*problem.output(z), loss, hist, i, evals, snaps)

    return _with_restarts(run_one, key, config)


def _given_label_problem(apply_fn, variables, target_grads, x_shape, label, config, feature=None, *,
                         require_one_example=True) -> _Problem:
    check_inputs(variables, target_grads, x_shape, label, require_one_example=require_one_example)
    if config.feature_weight > 0:
        if feature is None:
            raise ValueError("config.feature_weight > 0 needs the recovered feature: pass feature=")
        d = _models.last_layer(_params(variables))[0].shape[-2]
        if jnp.shape(feature) != (d,):
            raise ValueError(f"feature must be the last-layer input of shape ({d},), got shape {jnp.shape(feature)}")
    dtype = jax.tree_util.tree_leaves(target_grads)[0].dtype
    objective = _objective(apply_fn, variables, target_grads, config, label, feature)
    return _Problem(objective, lambda k: {"x": jax.random.normal(k, tuple(x_shape), dtype)}, lambda z: (z["x"], label))


def _idlg_problem(apply_fn, variables, target_grads, x_shape, config) -> _Problem:
    k = check_inputs(variables, target_grads, x_shape)
    kernel_grad, _ = _models.last_layer(target_grads)
    label = jax.nn.one_hot(_recovery.idlg_label(kernel_grad, method="rowsum"), k)
    return _given_label_problem(apply_fn, variables, target_grads, x_shape, label, config)


def _dlg_problem(apply_fn, variables, target_grads, x_shape, config, *, require_one_example=True) -> _Problem:
    k = check_inputs(variables, target_grads, x_shape, require_one_example=require_one_example)
    dtype = jax.tree_util.tree_leaves(target_grads)[0].dtype
    objective = _objective(apply_fn, variables, target_grads, config, None)

    def start(key_):
        kx, kv = jax.random.split(key_)
        return {"x": jax.random.normal(kx, tuple(x_shape), dtype), "v": jax.random.normal(kv, (k,), dtype)}

    return _Problem(objective, start, lambda z: (z["x"], jax.nn.softmax(z["v"])))


def given_label(
    key: Array,
    apply_fn: ApplyFn,
    variables: PyTree,
    target_grads: PyTree,
    x_shape: Sequence[int],
    label: Array,
    config: AttackConfig = PAPER,
    feature: Optional[Array] = None,
    *,
    require_one_example: bool = True,
) -> AttackResult:
    """Gradient matching over the image only, with a fixed label distribution ``label`` ``(K,)``.

    iDLG's loop (Zhao et al. 2020, ALGORITHMS.md §3.1) with any label: one-hot
    (iDLG), or a soft label recovered by Wang, Liang, He (ICLR 2024, §4.9(b)).
    ``x'`` starts at N(0, 1) with shape ``x_shape`` ``(H, W, C)``.

    ``feature`` ``(d,)``: a recovered last-layer input ``h_hat`` (e.g.
    ``jaxleak.recovery.soft_label(...).feature``); with ``config.feature_weight
    > 0`` the objective adds ``jaxleak.objectives.feature_distance`` of ``h(x')`` (from
    ``apply_fn(variables, x, return_feature=True)``) to it, paper 2's feature
    matching (§4.9(b); drop the head's kernel with ``exclude_tensors`` for its
    ``f`` variant). Ignored when ``feature_weight`` is 0.

    ``require_one_example=False`` lets a target gradient that cannot be one example's
    through (a defended one: noised, pruned, quantised; :func:`check_inputs`).
    """
    problem = _given_label_problem(apply_fn, variables, target_grads, x_shape, label, config, feature,
                                   require_one_example=require_one_example)
    return _solve(problem, key, config)


def idlg(
    key: Array,
    apply_fn: ApplyFn,
    variables: PyTree,
    target_grads: PyTree,
    x_shape: Sequence[int],
    config: AttackConfig = PAPER,
) -> AttackResult:
    """iDLG (Zhao et al. 2020): label ``argmin_k`` of the last-layer weight-gradient row sums, then matching.

    The label comes from ``jaxleak.recovery.idlg_label`` (ALGORITHMS.md §3.1)
    and is one-hot and fixed; only ``x'`` ``(H, W, C)`` is optimised.
    """
    return _solve(_idlg_problem(apply_fn, variables, target_grads, x_shape, config), key, config)


def dlg(
    key: Array,
    apply_fn: ApplyFn,
    variables: PyTree,
    target_grads: PyTree,
    x_shape: Sequence[int],
    config: AttackConfig = PAPER,
    *,
    require_one_example: bool = True,
) -> AttackResult:
    """DLG (Zhu et al. 2019): dummy image ``x' ~ N(0, 1)`` and label logits ``v ~ N(0, 1)`` optimised jointly.

    The dummy loss is the soft-label CE with ``softmax(v)`` (ALGORITHMS.md
    §2.1-§2.2); the predicted class is ``argmax(result.label)``.
    ``require_one_example``: as in :func:`given_label`.
    """
    problem = _dlg_problem(apply_fn, variables, target_grads, x_shape, config, require_one_example=require_one_example)
    return _solve(problem, key, config)


def inverting_gradients(
    key: Array,
    apply_fn: ApplyFn,
    variables: PyTree,
    target_grads: PyTree,
    x_shape: Sequence[int],
    label: Array,
    config: AttackConfig = INVERTING_GRADIENTS,
    feature: Optional[Array] = None,
    *,
    require_one_example: bool = True,
) -> AttackResult:
    """Inverting Gradients (Geiping et al. 2020): cosine distance + TV prior, Adam with step decay.

    :func:`given_label` with the :data:`INVERTING_GRADIENTS` defaults (paper 2's
    settings, ALGORITHMS.md §4.9(b)); pass ``config`` to change TV, signed
    gradients, box constraint or restarts. ``feature`` (with ``config.feature_weight > 0``,
    then the cosine feature term) and ``require_one_example``: as in :func:`given_label`.
    """
    return given_label(key, apply_fn, variables, target_grads, x_shape, label, config, feature,
                       require_one_example=require_one_example)


ATTACKS: dict[str, Callable[..., AttackResult]] = {
    "dlg": dlg,
    "idlg": idlg,
    "given_label": given_label,
    "inverting_gradients": inverting_gradients,
}

# --------------------------------------------------------------------------
# Many victims
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _one_victim(fn: Callable, apply_fn: ApplyFn, shape: tuple, config: AttackConfig, with_labels: bool) -> Callable:
    """One stable single-victim function per (attack, model, shape, config), so the
    driver's compilation cache (``jaxleak.victims.map_victims``) hits on every chunk."""
    # A partial of a module-level function, not a lambda, so strategy="processes" can pickle it.
    return functools.partial(_call_with_labels if with_labels else _call, fn, apply_fn, shape, config)


def _call(fn, apply_fn, shape, config, k, v, g):
    return fn(k, apply_fn, v, g, shape, config=config)


def _call_with_labels(fn, apply_fn, shape, config, k, v, g, y, *feature):
    return fn(k, apply_fn, v, g, shape, y, config=config, **({"feature": feature[0]} if feature else {}))


#: The problem behind each built-in attack, which the ``"stream"`` strategy steps slot by slot.
_PROBLEMS: dict[Callable, Callable[..., _Problem]] = {
    dlg: _dlg_problem,
    idlg: _idlg_problem,
    given_label: _given_label_problem,
    inverting_gradients: _given_label_problem,
}


class _Slots(NamedTuple):
    """The ``"stream"`` driver's carry: per slot (leading axis ``slots``) the unit it runs, that unit's try
    (from 1), the evaluations of its earlier tries, its key, its per-victim arguments and its loop carry;
    then the next unit to start, which slots hold a unit still running, and the results by unit."""

    unit: Array
    tries: Array
    prev_evals: Array
    key: Array
    args: tuple
    carry: tuple
    next_unit: Array
    occupied: Array
    outs: tuple


#: The stream refills at most this many slots per outer step, or an eighth of its slots if more.
STREAM_REFILL = 8


def _stream_program(fn: Callable, apply_fn: ApplyFn, shape: tuple, config: AttackConfig, in_axes: tuple,
                    slots: int, refill: Optional[int] = None) -> Callable:
    """``(keys, *args) -> AttackResult`` stacked over the victims of ``keys``, run ``slots`` at a time.

    Every slot holds one victim's run (one try of one restart: a *unit*); all slots take one outer step
    together (``vmap`` on the victim axis, as the ``"vmap"`` strategy's loops). When a unit's run ends, its
    result is written out and the slot is refilled in the same step: with the unit's next try if
    ``config.give_up`` abandoned it and tries are left (``_with_retries``' keys and summed evaluations),
    else with the next unit not yet started. So a slot is idle only once no unit is left to start, and the
    batched loop runs about ``units * mean / slots + max`` outer steps where a chunked vmap runs
    ``units / slots * max``. At most ``refill`` slots are refilled per step (default :data:`STREAM_REFILL`, or
    an eighth of the slots if more; more that end together wait a step, idle): a refill finishes and restarts
    only the rows it refills, so with hundreds of slots, where some run ends in nearly every step, it costs
    a small batch, not a whole one. Restarts are units of their own; the lowest finite loss wins, as
    ``_with_restarts``. ``args``: ``(variables, target_grads[, labels[, features]])`` with ``in_axes``
    0 (per victim) or None (shared); ``keys`` raw ``uint32`` keys, one per victim.
    """
    build = _PROBLEMS[fn]
    R = config.restarts

    def problem(k, *a):
        v, g, *rest = a
        extra = {"feature": rest[1]} if len(rest) > 1 else {}
        p = build(apply_fn, v, g, shape, *rest[:1], config=config, **extra)
        return p, _loop(p.objective, p.start(k), config)  # (the start only gives the loop z's structure)

    def init_one(k, *a):
        p, loop = problem(k, *a)
        return loop.init(p.start(k))

    def step_one(k, c, *a):
        return problem(k, *a)[1].step(c)

    def running_one(k, c, *a):
        return problem(k, *a)[1].running(c)

    def finish_one(k, c, *a):
        p, loop = problem(k, *a)
        z, loss, hist, i, evals, snaps = loop.finish(c)
        return (*p.output(z), loss, hist, i, evals, snaps)

    axes = (0, *in_axes)
    vmapped = lambda f, *lead: jax.vmap(f, in_axes=(*lead, *axes[1:]) if lead else axes, axis_name=config.victim_axis)
    init_v = vmapped(init_one)
    step_v, running_v, finish_v = (vmapped(f, 0, 0) for f in (step_one, running_one, finish_one))

    def run(keys, *args):
        n = keys.shape[0]
        units = n * R
        ukeys = keys if R == 1 else jax.vmap(lambda k: jax.random.split(k, R))(keys).reshape(units, *keys.shape[1:])
        width = min(slots, units)
        per_step = max(STREAM_REFILL, -(-width // 8)) if refill is None else refill
        per_step = min(width, max(1, per_step))  # slots refilled per outer step, at most
        per_victim = tuple(a for a, ax in zip(args, in_axes) if ax == 0)

        def gather(unit):  # the per-victim arguments of each slot's unit
            v = jnp.clip(unit, 0, units - 1) // R
            return tuple(jax.tree_util.tree_map(lambda x: x[v], a) for a in per_victim)

        def full(per_slot):  # the slots' arguments: their own where mapped, the shared ones otherwise
            it = iter(per_slot)
            return tuple(next(it) if ax == 0 else arg for arg, ax in zip(args, in_axes))

        def select(mask, new, old):
            return jax.tree_util.tree_map(lambda u, w: jnp.where(mask.reshape(-1, *(1,) * (u.ndim - 1)), u, w), new, old)

        unit = jnp.arange(width, dtype=jnp.int32)
        key = ukeys[:width]
        a = gather(unit)
        c = init_v(key, *full(a))
        res_shapes = jax.eval_shape(finish_v, key, c, *full(a))
        outs = tuple(jnp.zeros((units, *r.shape[1:]), r.dtype) for r in res_shapes)
        ones = jnp.ones(width, jnp.int32)
        state = _Slots(unit, ones, 0 * ones, key, a, c, jnp.asarray(width, jnp.int32), jnp.ones(width, bool), outs)

        def refill_ended(s, ended):
            # The first per_step ended slots (ascending), each finished and refilled; more wait for the next step
            # (their runs have ended: stepping them changes nothing). Only those rows are read and written.
            idx = jnp.nonzero(ended, size=per_step, fill_value=width)[0]
            valid = idx < width
            rows = jnp.minimum(idx, width - 1)
            take_rows = lambda t: jax.tree_util.tree_map(lambda x: x[rows], t)
            put_rows = lambda t, new: jax.tree_util.tree_map(lambda x, u: x.at[idx].set(u, mode="drop"), t, new)
            key, carry, a = s.key[rows], take_rows(s.carry), take_rows(s.args)
            unit, tries, prev = s.unit[rows], s.tries[rows], s.prev_evals[rows]
            res = AttackResult(*finish_v(key, carry, *full(a)))
            res = res._replace(evals=res.evals + prev)  # evaluations summed over the tries
            retry = valid & _tries_again(tries, res, config)
            final = valid & ~retry
            where = jnp.where(final, unit, units)  # out of range: dropped
            outs = tuple(o.at[where].set(r, mode="drop") for o, r in zip(s.outs, res))
            new = s.next_unit + jnp.cumsum(final.astype(jnp.int32)) - 1
            take = final & (new < units)
            unit = jnp.where(take, new, jnp.where(final, units, unit))
            base = ukeys[jnp.clip(unit, 0, units - 1)]
            key = jnp.where(retry[:, None], jax.vmap(jax.random.fold_in)(base, tries), jnp.where(take[:, None], base, key))
            fresh = gather(unit)
            return _Slots(
                unit=s.unit.at[idx].set(unit, mode="drop"),
                tries=s.tries.at[idx].set(jnp.where(retry, tries + 1, jnp.where(take, 1, tries)), mode="drop"),
                prev_evals=s.prev_evals.at[idx].set(jnp.where(retry, res.evals, jnp.where(take, 0, prev)), mode="drop"),
                key=s.key.at[idx].set(key, mode="drop"),
                args=put_rows(s.args, fresh),
                carry=put_rows(s.carry, select(retry | take, init_v(key, *full(fresh)), carry)),
                next_unit=s.next_unit + jnp.sum(final, dtype=jnp.int32),
                occupied=s.occupied.at[idx].set(retry | take, mode="drop"),
                outs=outs,
            )

        def body(s):
            s = s._replace(carry=step_v(s.key, s.carry, *full(s.args)))
            ended = s.occupied & ~running_v(s.key, s.carry, *full(s.args))
            return lax.cond(jnp.any(ended), lambda s: refill_ended(s, ended), lambda s: s, s)

        outs = lax.while_loop(lambda s: jnp.any(s.occupied), body, state).outs
        if R > 1:
            outs = _best_restart(tuple(o.reshape(n, R, *o.shape[1:]) for o in outs), axis=1)
        return AttackResult(*outs)

    def program(keys, *args):
        with _precision(config):
            return run(keys, *args)

    return program


@functools.lru_cache(maxsize=32)
def _stream_compiled(fn, apply_fn, shape, config, in_axes, slots, devices: tuple, refill: Optional[int] = None) -> Callable:
    """``jit`` of :func:`_stream_program`; over several devices each streams its own share (``jax.shard_map``)."""
    program = _stream_program(fn, apply_fn, shape, config, in_axes, slots, refill)
    return _victims._jit_over_devices(program, (0, *in_axes), devices)


def _stream_victims(fn, apply_fn, shape, config, keys, args, in_axes, *, slots, chunk_size, devices, progress):
    """The ``"stream"`` strategy of :func:`attack_victims`: waves of ``chunk_size`` victims (padded by
    repeating the last, so every wave reuses one program), each streamed through ``slots`` slots per device."""
    if fn not in _PROBLEMS:
        raise ValueError("strategy='stream' runs the built-in attacks (a name in ATTACKS), not a function of "
                         "your own: use 'vmap', 'loop' or 'processes' for it")
    n = keys.shape[0]
    devices = tuple(devices) if devices is not None else tuple(_victims.default_devices("vmap"))
    if not devices:
        raise ValueError("devices= is empty")
    d = len(devices)
    if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
        keys = jax.random.key_data(keys)  # raw keys draw the same numbers, and select like any array
    wave = -(-max(1, min(chunk_size or n, n)) // d) * d
    if slots is None:
        one = _one_victim(fn, apply_fn, shape, config, len(in_axes) > 2)
        slots = _victims._per_device_chunk(one, (keys[0], *_victims._take(args, in_axes, 0)), wave // d)
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    program = _stream_compiled(fn, apply_fn, shape, config, tuple(in_axes), int(slots), devices)
    return _victims._run_chunks(program, (keys, *args), (0, *in_axes), n, wave, devices, progress, "attack")


def _check_victims_finite(target_grads: PyTree, labels: Optional[Array], features: Optional[Array] = None) -> None:
    """Raises ``ValueError`` naming the victims and tensors with NaN or Inf in a stacked input.

    The one-victim attacks check this only on concrete arrays (:func:`check_inputs`);
    under the driver's ``jit`` they see tracers, and one victim's NaN would otherwise come
    back as a NaN reconstruction. Reduced where the arrays live: only V flags reach the host.
    """
    named = [(_objectives.tensor_name(path), a) for path, a in jax.tree_util.tree_flatten_with_path(target_grads)[0]]
    named += [(name, a) for name, a in (("labels", labels), ("features", features)) if a is not None]
    if not _is_concrete(*(a for _, a in named)):
        return
    bad_victims, bad_tensors = set(), []
    for name, a in named:
        a = jnp.asarray(a)
        ok = np.asarray(jnp.isfinite(a.reshape(a.shape[0], -1)).all(axis=1))
        if not ok.all():
            bad_victims.update(np.flatnonzero(~ok).tolist())
            bad_tensors.append(name)
    if bad_victims:
        shown = sorted(bad_victims)
        more = f" and {len(shown) - 10} more" if len(shown) > 10 else ""
        raise ValueError(f"NaN or Inf in the inputs of {len(shown)} victim(s) {shown[:10]}{more}, "
                         f"in {bad_tensors}: drop or fix them before attacking")


def attack_victims(
    attack: str | Callable[..., AttackResult],
    key: Array,
    apply_fn: ApplyFn,
    variables: PyTree,
    target_grads: PyTree,
    x_shape: Sequence[int],
    labels: Optional[Array] = None,
    *,
    features: Optional[Array] = None,
    config: AttackConfig = PAPER,
    per_victim_params: bool = True,
    x_true: Optional[Array] = None,
    strategy: str = "auto",
    chunk_size: Optional[int] = None,
    progress: bool = False,
    workers: Optional[int] = None,
    pool: Optional[_processes.WorkerPool] = None,
    require_one_example: bool = True,
    devices: Optional[Sequence[jax.Device]] = None,
    slots: Optional[int] = None,
) -> dict[str, np.ndarray]:
    """Runs one attack on V victims (``jaxleak.victims.map_victims``) and scores it.

    Args:
      attack: a name in :data:`ATTACKS` or a one-victim attack function.
      key: one PRNG key, split into one per victim, or ``(V, 2)`` keys, one per victim.
      variables: stacked per-victim variables (leading axis V) or one shared model.
      target_grads: stacked shared gradients, leading axis V.
      labels: ``(V, K)`` for ``given_label``/``inverting_gradients``.
      features: ``(V, d)`` recovered last-layer inputs, one per victim (e.g.
        ``jaxleak.recovery.soft_label(...).feature``), for the feature term of
        ``given_label``/``inverting_gradients``; needs ``labels`` and ``config.feature_weight > 0``.
      x_true: ``(V, H, W, C)`` private images for MSE/PSNR/SSIM (optional).
      strategy: ``"vmap"``, ``"stream"``, ``"loop"``, ``"processes"`` or ``"auto"`` (:data:`DEFAULT_STRATEGY`
        per backend). ``"stream"``: ``slots`` victims at a time under ``vmap``, each slot refilled with
        the next victim (or its next try, with ``config.retries``) as soon as its victim's run ends,
        so finished victims do not idle until the slowest of their chunk is done; the built-in
        attacks only. ``chunk_size`` is then the victims of one compiled program (default all). ``"processes"`` (CPU): one worker process per core, each pinned to
        its core with one XLA device (``jaxleak.processes``), victims dealt one at a time;
        on the 2-core CPU 1.4x the 2-device loop's victims/s, startup included (16
        CIFAR-100 victims, 2026-12-04). ``attack`` must then be a
        name in :data:`ATTACKS` or a module-level function, ``apply_fn`` picklable, and a
        calling script needs an ``if __name__ == "__main__":`` guard (``spawn``).
      workers: worker processes for ``"processes"`` (``None``: one per available core).
      pool: a ``jaxleak.processes.WorkerPool`` for ``"processes"``, kept across calls: its
        workers start once and keep each compiled attack (~2.7 s saved per call, iDLG on
        the 2-core CPU); not with ``workers``.
      slots: ``"stream"``'s batch width per device (default: what ``"vmap"`` would take as its
        chunk, all victims up to 256 per device, else as many as fit the backend's memory budget).
      devices: the devices victims run on (``jaxleak.victims.map_victims``): under ``"vmap"`` each
        chunk is sharded over them and each device's loops run until its own victims are done
        (``"stream"``: each device streams its share of each wave);
        under ``"loop"`` victims are dealt to them round-robin. Default: every local device,
        except one under ``"vmap"`` on the CPU (``jaxleak.victims.default_devices``).
      require_one_example: refuse target gradients whose last-layer kernel gradient cannot
        be one example's (``jaxleak.recovery.gradient_reason``: rank > 1, as a batch's, or
        all zero). Turn off to attack defended (noised, pruned) gradients, which are not
        rank 1. iDLG is always checked: its label read-out needs a rank-1 head gradient
        (under ``jit`` it would give no class, an all-zero label, instead of an error).

    Raises ``ValueError`` before any victim runs when a victim's target gradient, label or
    feature holds NaN or Inf (naming the victims and tensors), or, with ``require_one_example``,
    when its last-layer kernel gradient cannot be one example's.

    Returns:
      numpy arrays with a leading V axis: ``reconstruction``, ``label`` (K,),
      ``label_index``, ``loss``, ``loss_history``, ``steps``, ``evals``,
      ``snapshots``, ``gave_up`` (:func:`gave_up`: abandoned by ``config.give_up``), ``stalled``
      (:func:`stalled`: stopped by ``config.stall``) and, with
      ``x_true``, ``mse``, ``psnr``, ``ssim``.
    """
    fn = ATTACKS[attack] if isinstance(attack, str) else attack
    n = jax.tree_util.tree_leaves(target_grads)[0].shape[0]
    if features is not None:
        if labels is None:
            raise ValueError("features= goes with labels= (given_label, inverting_gradients): the feature term needs a label")
        if config.feature_weight <= 0:
            raise ValueError("features= is used only with config.feature_weight > 0; it is 0, so they would be ignored")
        d = _models.last_layer(_params(variables))[0].shape[-2]
        if jnp.shape(features) != (n, d):
            raise ValueError(f"features must be ({n}, {d}): one last-layer input per victim, got shape {jnp.shape(features)}")
    _check_victims_finite(target_grads, labels, features)
    if (require_one_example or fn is idlg) and _is_concrete(*jax.tree_util.tree_leaves(target_grads)):
        _check_one_example(_models.last_layer(target_grads)[0], "attack_victims: target_grads")
    keys = _victims.victim_keys(key, n)
    if strategy == "auto":
        strategy = DEFAULT_STRATEGY.get(jax.default_backend(), "vmap")
    if slots is not None and strategy != "stream":
        raise ValueError(f"slots= is the width of strategy='stream', got strategy={strategy!r}")
    # Under vmap the loops run until the chunk's last victim is done and mask the finished ones
    # (AttackConfig.victim_axis); the loop strategy runs each victim unmapped.
    config = dataclasses.replace(config, victim_axis=VICTIM_AXIS if strategy in ("vmap", "stream") else None)
    shape = tuple(x_shape)
    args, axes = (keys, variables, target_grads), (0, 0 if per_victim_params else None, 0)
    if labels is not None:
        args, axes = args + (labels,), axes + (0,)
    if features is not None:
        args, axes = args + (features,), axes + (0,)
    if strategy == "stream":
        if workers is not None or pool is not None:
            raise ValueError("workers= and pool= are for strategy='processes', not 'stream'")
        res = _stream_victims(fn, apply_fn, shape, config, keys, args[1:], axes[1:], slots=slots,
                              chunk_size=chunk_size, devices=devices, progress=progress)
    else:
        one = _one_victim(fn, apply_fn, shape, config, labels is not None)
        res = _victims.map_victims(one, args, axes, chunk_size=chunk_size, strategy=strategy, progress=progress,
                                   desc="attack", axis_name=config.victim_axis, workers=workers, pool=pool,
                                   devices=devices)
    out = {name: np.asarray(v) for name, v in res._asdict().items()}
    out["gave_up"] = np.asarray(gave_up(res, config))
    out["stalled"] = np.asarray(stalled(res, config))
    out["reconstruction"] = out.pop("x")
    out["label_index"] = out["label"].argmax(-1)
    if x_true is not None:
        rec = jnp.asarray(out["reconstruction"])
        out["mse"] = np.asarray(_metrics.mse(rec, x_true))
        out["psnr"] = np.asarray(_metrics.psnr(rec, x_true))
        out["ssim"] = np.asarray(_metrics.ssim(rec, x_true))
    return out
