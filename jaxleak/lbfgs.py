"""L-BFGS with PyTorch's ``torch.optim.LBFGS`` semantics, as a pure ``init``/``update`` pair.

The DLG and iDLG numbers (Zhu et al. 2019; Zhao et al. 2020, Table 1 and
Figure 1) were produced with ``torch.optim.LBFGS(lr=1)``: a fixed step, no line
search, up to ``max_iter`` inner iterations per ``step`` call, a curvature
history that persists across calls, and a set of early-exit tolerances
(ALGORITHMS.md §2.3). optax's ``lbfgs`` uses a zoom line search and behaves
differently (JAX_NOTES.md, "Gradient matching"), so this module ports the
PyTorch rules one for one on a flat parameter vector ``x`` ``(n,)``. A
learning-rate scheduler (paper 2 runs ``MultiStepLR`` on top, ALGORITHMS.md
§4.9(b)) is the ``lr`` argument of :func:`update`, one value per ``step`` call.

Every early exit of PyTorch's inner loop is a boolean in a ``lax.while_loop``
carry, so one call is ``jit``-able and ``vmap``-able over victims. A finished
victim's carry is frozen by the loop body itself (its history row writes and
state updates are masked), so under ``vmap`` the others continue. Plain
``vmap`` makes the loop predicate batched, and ``while_loop``'s batching rule
then also selects every carry between old and new on every iteration — with
the ``(m, n)`` history that is a full copy and select of it per iteration.
With ``axis_name`` (the name given to ``jax.vmap(..., axis_name=)``) the
predicate is "any victim on the axis still running", which is not batched, so
only the masked row writes touch the history.

The history is a ring buffer of ``history_size`` slots. The direction
``-H g`` is computed one of two ways (``TorchLBFGSConfig.direction``):

- ``"two_loop"``: the two-loop recursion (Nocedal & Wright 2006, Algorithm
  7.4) walks the buffer newest to oldest and back, exactly as PyTorch walks its
  Python lists: 2·count dependent steps of a loop with a data-dependent trip
  count.
- ``"compact"``: the same ``H`` in the compact representation of Byrd,
  Nocedal & Schnabel (1994, Theorem 2.2), with the Gram matrices ``S^T Y`` and
  ``Y^T Y`` kept up to date in the state: a few batched matrix products and two
  ``m x m`` triangular solves, no loop. Four passes over the ``(m, n)`` history
  per iteration (``S^T g``, ``Y^T g`` and the two products back); the new pair's
  Gram entries come from ``S^T g`` and ``Y^T g`` at this and the previous
  gradient (``y = g - g_prev``), not from three more passes (CIFAR-100 LeNet
  iDLG, one core: 0.80-0.81 against 0.86-0.87 ms per evaluation).
- ``"auto"`` (default): ``"compact"``. On a GPU every step of the two-loop
  recursion is a kernel launch and a device-to-host sync of the loop predicate;
  on the 2-core CPU, with a full history of 100 pairs and n = 3,072, the
  two-loop direction took 0.68 ms against 0.18 ms (+ 0.10 ms of Gram updates),
  and the whole iDLG attack 2.76 against 2.43 ms per evaluation.

Both give the same direction up to rounding (tests compare them in float64).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
ValueAndGrad = Callable[[Array], tuple[Array, Array]]


@dataclasses.dataclass(frozen=True)
class TorchLBFGSConfig:
    """``torch.optim.LBFGS`` hyper-parameters; the defaults are iDLG's (``lr=1``, PyTorch defaults).

    ``max_eval`` ``None`` means PyTorch's ``max_iter * 5 // 4`` (25).
    """

    lr: float = 1.0
    max_iter: int = 20
    max_eval: Optional[int] = None
    tolerance_grad: float = 1e-7
    tolerance_change: float = 1e-9
    history_size: int = 100
    direction: str = "auto"

    def __post_init__(self):
        if self.direction not in ("auto", "two_loop", "compact"):
            raise ValueError(f"direction must be 'auto', 'two_loop' or 'compact', got {self.direction!r}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
        if self.history_size < 1:
            raise ValueError(f"history_size must be >= 1, got {self.history_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    @property
    def eval_budget(self) -> int:
        return self.max_eval if self.max_eval is not None else self.max_iter * 5 // 4


class TorchLBFGSState(NamedTuple):
    """Everything ``torch.optim.LBFGS`` keeps in ``self.state`` (plus the iterate).

    Shapes: ``x, d, prev_grad`` ``(n,)``; ``s_hist, y_hist`` ``(m, n)``;
    ``rho`` ``(m,)``; ``sy[i, j] = s_i . y_j`` and ``yy[i, j] = y_i . y_j``
    ``(m, m)`` over ring slots (used by the compact direction; ``sy`` only where
    ``s_i`` is not newer than ``y_j``, the part it reads), and ``sg = S prev_grad``,
    ``yg = Y prev_grad`` ``(m,)`` from the last compact direction; the rest
    scalars. ``head`` is the next ring slot, ``count`` the number of stored pairs.
    """

    x: Array
    d: Array
    t: Array
    prev_grad: Array
    prev_loss: Array
    s_hist: Array
    y_hist: Array
    rho: Array
    sy: Array
    yy: Array
    sg: Array
    yg: Array
    head: Array
    count: Array
    h_diag: Array
    n_iter: Array
    func_evals: Array


class TorchLBFGS(NamedTuple):
    """The optimiser as a pair of pure functions (optax style)."""

    init: Callable[[Array], TorchLBFGSState]
    update: Callable[..., tuple[TorchLBFGSState, Array]]


def init(x0: Array, config: TorchLBFGSConfig = TorchLBFGSConfig()) -> TorchLBFGSState:
    """Fresh optimiser state at the flat iterate ``x0`` ``(n,)`` (no history, ``n_iter = 0``)."""
    x0 = jnp.asarray(x0)
    if x0.ndim != 1:
        raise ValueError(f"x0 must be a flat vector (n,), got shape {x0.shape}; use jax.flatten_util.ravel_pytree")
    m, n, dt = config.history_size, x0.shape[0], x0.dtype
    zero = jnp.zeros((), dt)
    return TorchLBFGSState(
        x=x0,
        d=jnp.zeros_like(x0),
        t=zero,
        prev_grad=jnp.zeros_like(x0),
        prev_loss=zero,
        s_hist=jnp.zeros((m, n), dt),
        y_hist=jnp.zeros((m, n), dt),
        rho=jnp.zeros((m,), dt),
        sy=jnp.zeros((m, m), dt),
        yy=jnp.zeros((m, m), dt),
        sg=jnp.zeros((m,), dt),
        yg=jnp.zeros((m,), dt),
        head=jnp.zeros((), jnp.int32),
        count=jnp.zeros((), jnp.int32),
        h_diag=jnp.ones((), dt),
        n_iter=jnp.zeros((), jnp.int32),
        func_evals=jnp.zeros((), jnp.int32),
    )


def two_loop(grad: Array, s_hist: Array, y_hist: Array, rho: Array, head: Array, count: Array, h_diag: Array) -> Array:
    """The L-BFGS direction ``-H g`` by the two-loop recursion over a ring buffer.

    ``H`` is the inverse-Hessian approximation built from the ``count`` most
    recent pairs (oldest at slot ``head - count``), started from ``h_diag * I``
    (Nocedal & Wright 2006, Alg. 7.4; PyTorch's ``lbfgs.py``). ``grad`` ``(n,)``.
    """
    m = s_hist.shape[0]

    def newest_first(j, carry):
        q, alpha = carry
        i = (head - 1 - j) % m
        a = rho[i] * jnp.vdot(s_hist[i], q)
        return q - a * y_hist[i], alpha.at[i].set(a)

    q, alpha = lax.fori_loop(0, count, newest_first, (-grad, jnp.zeros_like(rho)))

    def oldest_first(j, r):
        i = (head - count + j) % m
        b = rho[i] * jnp.vdot(y_hist[i], r)
        return r + (alpha[i] - b) * s_hist[i]

    return lax.fori_loop(0, count, oldest_first, q * h_diag)


def compact_direction(grad: Array, s_hist: Array, y_hist: Array, sy: Array, yy: Array, head: Array, count: Array,
                      h_diag: Array, sg: Optional[Array] = None, yg: Optional[Array] = None) -> Array:
    """The L-BFGS direction ``-H g`` from the compact representation (Byrd, Nocedal, Schnabel 1994, Thm 2.2).

    With the ``k = count`` pairs in chronological order as columns of ``S`` and
    ``Y``, ``R = triu(S^T Y)``, ``D = diag(S^T Y)`` and ``gamma = h_diag``::

        H = gamma I + [S  gamma Y] [[R^-T (D + gamma Y^T Y) R^-1, -R^-T], [-R^-1, 0]] [S^T; gamma Y^T]

    — the same matrix the two-loop recursion applies. ``sy`` and ``yy`` are the
    Gram matrices over ring slots (of ``sy`` only the entries with ``s_i`` not
    newer than ``y_j`` are read); the ring is put in chronological order by
    permuting these ``m x m`` matrices, never the ``(m, n)`` history. ``sg``,
    ``yg``: ``s_hist @ grad`` and ``y_hist @ grad`` if the caller has them.
    """
    m = s_hist.shape[0]
    # Chronological position j is ring slot (shift + j) % m: a cyclic shift (contiguous slices), not a gather.
    shift = (head - count) % m
    order = lambda c, axis=0: jnp.roll(c, -shift, axis)
    valid = jnp.arange(m) < count
    both = valid[:, None] & valid[None, :]
    sy_o = order(order(sy), 1)
    yy_o = jnp.where(both, order(order(yy), 1), 0.0)
    r = jnp.where(both, jnp.triu(sy_o), jnp.eye(m, dtype=sy.dtype))
    dg = jnp.where(valid, jnp.diagonal(sy_o), 0.0)
    sg = s_hist @ grad if sg is None else sg
    yg = y_hist @ grad if yg is None else yg
    a = jnp.where(valid, order(sg), 0.0)
    b = jnp.where(valid, order(yg), 0.0)
    u = jax.scipy.linalg.solve_triangular(r, a, lower=False)  # R^-1 S^T g
    w = dg * u + h_diag * (yy_o @ u) - h_diag * b
    top = jax.scipy.linalg.solve_triangular(r, w, lower=False, trans="T")
    unorder = lambda c: jnp.roll(c, shift)
    hg = h_diag * grad + unorder(top) @ s_hist - h_diag * (unorder(u) @ y_hist)
    return -hg


def _direction(cfg: "TorchLBFGSConfig") -> str:
    return "compact" if cfg.direction == "auto" else cfg.direction


def any_running(running: Array, axis_name: Optional[str] = None) -> Array:
    """``running`` itself, or with ``axis_name`` whether it holds for any member of that ``vmap`` axis.

    As a ``lax.while_loop`` predicate the latter is the same for the whole axis
    (not batched), so ``vmap`` runs the loop until the last member is done
    without selecting every carry between old and new; the loop body must then
    leave finished members unchanged itself.
    """
    if axis_name is None:
        return running
    return lax.psum(running.astype(jnp.int32), axis_name) > 0


def update(
    state: TorchLBFGSState,
    value_and_grad: ValueAndGrad,
    config: TorchLBFGSConfig = TorchLBFGSConfig(),
    value: Optional[Array] = None,
    grad: Optional[Array] = None,
    lr: Optional[Array] = None,
    active: Optional[Array] = None,
    axis_name: Optional[str] = None,
) -> tuple[TorchLBFGSState, Array]:
    """One ``torch.optim.LBFGS.step`` (ALGORITHMS.md §2.3): up to ``max_iter`` fixed-step iterations.

    Args:
      state: from :func:`init` or a previous :func:`update`.
      value_and_grad: ``x (n,) -> (loss (), grad (n,))``, the closure.
      config: hyper-parameters.
      value, grad: the closure evaluated at ``state.x`` if the caller already
        has it (saves the first evaluation, which PyTorch always makes).
      lr: this step's learning rate (a scalar, may be traced), overriding
        ``config.lr``: PyTorch's ``group['lr']`` as a scheduler such as
        ``MultiStepLR`` sets it between ``step`` calls. It gives the step size
        (``min(1, 1/|g|_1) lr`` at the optimiser's very first iteration, ``lr``
        afterwards); the history, ``d`` and ``t`` persist across calls as in
        PyTorch, so the first curvature pair of a step uses the previous step's
        ``t``. It must be > 0 (not checked under ``jit``). ``None``: ``config.lr``.
      active: a boolean scalar, possibly traced; ``False`` returns ``state``
        unchanged (no iteration, no evaluation counted). A caller that stops a
        victim early uses it instead of a ``lax.cond``, which ``vmap`` would
        turn into a select over the whole state. ``None``: ``True``.
      axis_name: the ``jax.vmap`` axis this call is mapped over, if any: the
        inner loop then runs while any victim on it runs (:func:`any_running`)
        and finished victims are masked. Same results up to float32 rounding
        (a different program); under ``vmap`` it saves a copy and a select of
        the history per iteration, and the closure's evaluation for the whole
        batch at an iteration where no victim evaluates (the one that ends a
        step on ``max_iter``: 1 in 21 of a full step's). ``None``: no axis (a
        plain ``vmap`` still works, with those selects).

    Returns:
      ``(new_state, loss at the start of the step)``, as PyTorch's ``step``
      returns the loss of its first closure call.
    """
    cfg = config
    m = cfg.history_size
    if value is None or grad is None:
        value, grad = value_and_grad(state.x)
    value = jnp.asarray(value, state.x.dtype)
    loss0 = value
    lr = cfg.lr if lr is None else jnp.asarray(lr, state.x.dtype)
    first_opt = jnp.max(jnp.abs(grad)) <= cfg.tolerance_grad
    compact = _direction(cfg) == "compact"
    active = jnp.ones((), bool) if active is None else jnp.asarray(active, bool)

    def cond(c):
        return any_running(~c["stop"], axis_name)

    def body(c):
        live = ~c["stop"]  # False only for a victim that stopped while others on the axis run
        k = c["k"] + 1
        n_iter = c["n_iter"] + 1
        first = n_iter == 1
        g = c["g"]
        # Curvature pair from the previous iteration (or the previous step call).
        y = g - c["prev_grad"]
        s = c["d"] * c["t"]
        ys = jnp.vdot(y, s)
        push = live & (~first) & (ys > 1e-10)
        head = c["head"]
        s_hist = c["s_hist"].at[head].set(jnp.where(push, s, c["s_hist"][head]))
        y_hist = c["y_hist"].at[head].set(jnp.where(push, y, c["y_hist"][head]))
        rho = c["rho"].at[head].set(jnp.where(push, 1.0 / jnp.where(push, ys, 1.0), c["rho"][head]))
        gram_sy, gram_yy, sg, yg = c["sy"], c["yy"], c["sg"], c["yg"]
        yy = jnp.vdot(y, y)
        if compact:
            # S^T g and Y^T g with the new pair in: the direction's two passes over the history. The new
            # slot's column of S^T Y and Y^T Y then needs none: s_i . y = s_i . g - s_i . g_prev (and
            # y_i alike), the last direction's S^T g_prev from the carry; its own entries are ys and yy.
            # Its row of S^T Y (s . y_j, y_j older) is never read (compact_direction reads R = triu).
            sg, yg = s_hist @ g, y_hist @ g
            slot = jnp.arange(m) == head
            sy_col = jnp.where(slot, ys, sg - c["sg"])
            yy_col = jnp.where(slot, yy, yg - c["yg"])
            gram_sy = jnp.where(push, gram_sy.at[:, head].set(sy_col), gram_sy)
            gram_yy = jnp.where(push, gram_yy.at[head, :].set(yy_col).at[:, head].set(yy_col), gram_yy)
        head = jnp.where(push, (head + 1) % m, head)
        count = jnp.where(push, jnp.minimum(c["count"] + 1, m), c["count"])
        h_diag = jnp.where(push, ys / jnp.where(push, yy, 1.0), c["h_diag"])
        # The very first iteration of the optimiser's life restarts the history (PyTorch does too).
        count = jnp.where(first, 0, count)
        head = jnp.where(first, 0, head)
        h_diag = jnp.where(first, jnp.ones_like(h_diag), h_diag)
        if compact:
            d = jnp.where(first, -g, compact_direction(g, s_hist, y_hist, gram_sy, gram_yy, head, count, h_diag, sg, yg))
        else:
            d = jnp.where(first, -g, two_loop(g, s_hist, y_hist, rho, head, count, h_diag))
        prev_grad, prev_loss = g, c["loss"]
        t = jnp.where(first, jnp.minimum(1.0, 1.0 / jnp.sum(jnp.abs(g))) * lr, lr).astype(g.dtype)
        gtd = jnp.vdot(g, d)
        not_descent = gtd > -cfg.tolerance_change
        x = jnp.where(not_descent, c["x"], c["x"] + t * d)
        do_eval = live & (~not_descent) & (k != cfg.max_iter)
        skip = lambda _: (c["loss"], g)
        if axis_name is None:
            loss, g_new = lax.cond(do_eval, value_and_grad, skip, x)
        else:
            # vmap turns a cond on the batched do_eval into a select that evaluates every victim at every
            # iteration; on whether any victim evaluates, it stays a cond. At the iteration that ends on
            # max_iter no victim evaluates, which saves one evaluation of the batch in each full step.
            def evaluate(x):
                loss, g_new = value_and_grad(x)
                return jnp.where(do_eval, loss, c["loss"]), jnp.where(do_eval, g_new, g)

            loss, g_new = lax.cond(any_running(do_eval, axis_name), evaluate, skip, x)
        loss = jnp.asarray(loss, g.dtype)
        evals = c["evals"] + do_eval.astype(jnp.int32)
        opt_cond = do_eval & (jnp.max(jnp.abs(g_new)) <= cfg.tolerance_grad)
        stop = (
            not_descent
            | (k == cfg.max_iter)
            | (evals >= cfg.eval_budget)
            | opt_cond
            | (jnp.max(jnp.abs(t * d)) <= cfg.tolerance_change)
            | (jnp.abs(loss - prev_loss) < cfg.tolerance_change)
        )
        new = dict(
            k=k, n_iter=n_iter, x=x, g=g_new, loss=loss, d=d, t=t, prev_grad=prev_grad, prev_loss=prev_loss,
            head=head, count=count, h_diag=h_diag, evals=evals, stop=stop, sg=sg, yg=yg,
        )
        # A finished victim keeps its carry: the small entries by a select, the history (written
        # only where push, which includes live) as it is.
        new = {key: jnp.where(live, v, c[key]) for key, v in new.items()}
        return dict(new, s_hist=s_hist, y_hist=y_hist, rho=rho, sy=gram_sy, yy=gram_yy)

    carry = dict(state._asdict(), k=jnp.zeros((), jnp.int32), g=grad, loss=value, evals=jnp.ones((), jnp.int32),
                 stop=first_opt | ~active)
    del carry["func_evals"]
    c = lax.while_loop(cond, body, carry)
    new = TorchLBFGSState(**{f: c[f] for f in TorchLBFGSState._fields if f != "func_evals"},
                          func_evals=state.func_evals + jnp.where(active, c["evals"], 0))
    return new, loss0


def torch_lbfgs(config: TorchLBFGSConfig = TorchLBFGSConfig()) -> TorchLBFGS:
    """``(init, update)`` closed over ``config``:
    ``update(state, value_and_grad, value=None, grad=None, lr=None, active=None, axis_name=None)``."""
    return TorchLBFGS(
        init=lambda x0: init(x0, config),
        update=lambda state, vg, value=None, grad=None, lr=None, active=None, axis_name=None: update(
            state, vg, config, value, grad, lr, active, axis_name),
    )
