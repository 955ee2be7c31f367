"""The PyTorch-semantics L-BFGS: exact maths on quadratics, torch agreement, jit/vmap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxleak import lbfgs


def _explicit_inverse_hessian(s_list, y_list, h0):
    """BFGS inverse update H <- (I - rho s y^T) H (I - rho y s^T) + rho s s^T, oldest pair first."""
    n = s_list[0].shape[0]
    h = h0 * np.eye(n)
    for s, y in zip(s_list, y_list):
        rho = 1.0 / (y @ s)
        v = np.eye(n) - rho * np.outer(y, s)
        h = v.T @ h @ v + rho * np.outer(s, s)
    return h


@pytest.mark.parametrize("count,head", [(3, 3), (5, 5), (5, 2)])
def test_two_loop_equals_explicit_inverse_hessian_product(count, head):
    rng = np.random.default_rng(count + head)
    n, m = 7, 5
    a = rng.normal(size=(n, n))
    a = a @ a.T + n * np.eye(n)  # SPD, so every pair has y^T s > 0
    s_list = [rng.normal(size=n) for _ in range(count)]
    y_list = [a @ s for s in s_list]
    # Place the pairs in a ring buffer whose oldest entry sits at slot head - count.
    s_hist, y_hist, rho = np.zeros((m, n)), np.zeros((m, n)), np.zeros(m)
    for j, (s, y) in enumerate(zip(s_list, y_list)):
        i = (head - count + j) % m
        s_hist[i], y_hist[i], rho[i] = s, y, 1.0 / (y @ s)
    g = rng.normal(size=n)
    h0 = (y_list[-1] @ s_list[-1]) / (y_list[-1] @ y_list[-1])
    with jax.enable_x64(True):
        d = lbfgs.two_loop(
            jnp.asarray(g), jnp.asarray(s_hist), jnp.asarray(y_hist), jnp.asarray(rho),
            jnp.asarray(head, jnp.int32), jnp.asarray(count, jnp.int32), jnp.asarray(h0),
        )
        d = np.asarray(d)
    np.testing.assert_allclose(d, -_explicit_inverse_hessian(s_list, y_list, h0) @ g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("count,head", [(1, 1), (3, 3), (5, 5), (5, 2), (4, 1)])
def test_compact_direction_equals_explicit_inverse_hessian_product(count, head):
    """Byrd-Nocedal-Schnabel's compact form gives the two-loop's H g; stale slots are ignored."""
    rng = np.random.default_rng(10 * count + head)
    n, m = 7, 5
    a = rng.normal(size=(n, n))
    a = a @ a.T + n * np.eye(n)
    s_list = [rng.normal(size=n) for _ in range(count)]
    y_list = [a @ s for s in s_list]
    s_hist, y_hist = rng.normal(size=(m, n)) * 1e3, rng.normal(size=(m, n)) * 1e3  # garbage in unused slots
    for j, (s, y) in enumerate(zip(s_list, y_list)):
        i = (head - count + j) % m
        s_hist[i], y_hist[i] = s, y
    g = rng.normal(size=n)
    h0 = (y_list[-1] @ s_list[-1]) / (y_list[-1] @ y_list[-1])
    with jax.enable_x64(True):
        d = lbfgs.compact_direction(
            jnp.asarray(g), jnp.asarray(s_hist), jnp.asarray(y_hist), jnp.asarray(s_hist @ y_hist.T),
            jnp.asarray(y_hist @ y_hist.T), jnp.asarray(head, jnp.int32), jnp.asarray(count, jnp.int32), jnp.asarray(h0),
        )
        d = np.asarray(d)
    np.testing.assert_allclose(d, -_explicit_inverse_hessian(s_list, y_list, h0) @ g, rtol=1e-9, atol=1e-11)


def test_compact_and_two_loop_updates_agree():
    """Whole optimiser runs with either direction follow the same iterates (float64), ring wrap-around included."""
    rng = np.random.default_rng(3)
    n = 12
    q = rng.normal(size=(n, n))
    a = q @ q.T / n + np.diag(np.linspace(0.1, 3.0, n))
    b = rng.normal(size=n)
    with jax.enable_x64(True):
        vg = jax.value_and_grad(lambda x: 0.5 * x @ jnp.asarray(a) @ x - jnp.asarray(b) @ x + 0.1 * jnp.sum(x**4))
        xs = {}
        for direction in ("two_loop", "compact"):
            cfg = lbfgs.TorchLBFGSConfig(max_iter=4, history_size=3, direction=direction)
            state = lbfgs.init(jnp.ones(n), cfg)
            step = jax.jit(lambda st: lbfgs.update(st, vg, cfg))
            for _ in range(5):
                state, _ = step(state)
            xs[direction] = np.asarray(state.x)
            assert int(state.n_iter) > 3  # the 3-slot ring wrapped
    np.testing.assert_allclose(xs["compact"], xs["two_loop"], rtol=1e-8, atol=1e-10)


def test_direction_name_is_checked():
    with pytest.raises(ValueError, match="direction"):
        lbfgs.TorchLBFGSConfig(direction="three_loop")


def _quadratic(a, b):
    return jax.value_and_grad(lambda x: 0.5 * x @ a @ x - b @ x)


def test_isotropic_quadratic_solved_at_second_iteration():
    # f = c/2 |x|^2 - b.x: the first secant pair gives H0 = 1/c exactly, so iteration 2 lands on b/c.
    with jax.enable_x64(True):
        n, c = 5, 3.0
        b = jnp.arange(1.0, n + 1)
        cfg = lbfgs.TorchLBFGSConfig(max_iter=2, max_eval=3)  # the default max_eval (2) would stop after 1
        state = lbfgs.init(jnp.zeros(n), cfg)
        state, _ = lbfgs.update(state, _quadratic(c * jnp.eye(n), b), cfg)
        np.testing.assert_allclose(state.x, b / c, rtol=1e-12)
        assert int(state.n_iter) == 2


def test_one_dimensional_quadratic_exact_after_secant():
    with jax.enable_x64(True):
        cfg = lbfgs.TorchLBFGSConfig(max_iter=2)
        state = lbfgs.init(jnp.array([4.0]), cfg)
        state, loss0 = lbfgs.update(state, _quadratic(jnp.array([[0.3]]), jnp.array([1.2])), cfg)
        np.testing.assert_allclose(state.x, [4.0], rtol=1e-12)
        np.testing.assert_allclose(loss0, 0.5 * 0.3 * 16 - 4.8)


def test_converges_on_ill_conditioned_quadratic_and_persists_history():
    rng = np.random.default_rng(0)
    n = 8
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = q @ np.diag(np.logspace(0, 2, n)) @ q.T
    b = rng.normal(size=n)
    with jax.enable_x64(True):
        vg = _quadratic(jnp.asarray(a), jnp.asarray(b))
        cfg = lbfgs.TorchLBFGSConfig(lr=1.0, max_iter=5)
        state = lbfgs.init(jnp.zeros(n), cfg)
        step = jax.jit(lambda s: lbfgs.update(s, vg, cfg))
        for _ in range(12):
            state, _ = step(state)
        # tolerance_change (|f_k - f_k-1| < 1e-9) ends steps near the optimum: error ~ sqrt(1e-9 / lambda_min).
        np.testing.assert_allclose(state.x, np.linalg.solve(a, b), rtol=1e-3, atol=1e-4)
        assert int(state.count) > 5  # the history survived across step calls


def test_tolerance_grad_returns_without_moving():
    cfg = lbfgs.TorchLBFGSConfig()
    state = lbfgs.init(jnp.ones(3), cfg)
    new, loss0 = lbfgs.update(state, jax.value_and_grad(lambda x: 0.0 * jnp.sum(x)), cfg)
    np.testing.assert_array_equal(new.x, state.x)
    assert int(new.n_iter) == 0 and int(new.func_evals) == 1 and float(loss0) == 0.0


def test_vmap_equals_loop():
    rng = np.random.default_rng(1)
    a = jnp.asarray(np.diag([1.0, 2.0, 5.0]))
    bs = jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)
    cfg = lbfgs.TorchLBFGSConfig(max_iter=4)

    def run(b):
        vg = jax.value_and_grad(lambda x: 0.5 * x @ a @ x - b @ x + 0.05 * jnp.sum(x**4))
        s = lbfgs.init(jnp.zeros(3), cfg)
        s, _ = lbfgs.update(s, vg, cfg)
        s, _ = lbfgs.update(s, vg, cfg)
        return s.x, s.func_evals

    xs, ev = jax.jit(jax.vmap(run))(bs)
    for i in range(3):
        x1, e1 = jax.jit(run)(bs[i])
        np.testing.assert_allclose(xs[i], x1, rtol=1e-5, atol=1e-6)
        assert int(ev[i]) == int(e1)


def test_inactive_update_returns_the_state_unchanged():
    cfg = lbfgs.TorchLBFGSConfig(max_iter=3)
    vg = jax.value_and_grad(lambda x: jnp.sum((x - 1.0) ** 2) + 0.1 * jnp.sum(x**4))
    state, _ = lbfgs.update(lbfgs.init(jnp.zeros(4), cfg), vg, cfg)  # a state with history
    new, loss0 = jax.jit(lambda s: lbfgs.update(s, vg, cfg, active=False))(state)
    for a, b in zip(state, new):
        np.testing.assert_array_equal(a, b)
    assert float(loss0) == float(vg(state.x)[0])


def test_axis_name_equals_plain_vmap():
    """With the vmap axis named, the inner loop runs while any member runs and masks the finished ones:
    the same result as a plain vmap (whose batched predicate selects every carry), members stopping
    at different iterations; an inactive member stays put. In float64: the two are different programs,
    and in float32 their rounding near a minimum (gradients as differences of terms ~10) reaches 1e-3
    of the history's entries under some XLA flags."""
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        a = jnp.asarray(np.diag([1.0, 2.0, 5.0]))
        bs = jnp.asarray(rng.normal(size=(4, 3)) * np.array([[1.0], [1e-3], [10.0], [1.0]]))
        active = jnp.array([True, True, True, False])
        cfg = lbfgs.TorchLBFGSConfig(max_iter=20)

        def run(b, act, axis_name=None):
            vg = jax.value_and_grad(lambda x: 0.5 * x @ a @ x - b @ x + 0.05 * jnp.sum(x**4))
            s = lbfgs.init(jnp.zeros(3, jnp.float64), cfg)
            s, _ = lbfgs.update(s, vg, cfg, axis_name=axis_name)
            return lbfgs.update(s, vg, cfg, active=act, axis_name=axis_name)[0]

        plain = jax.jit(jax.vmap(run))(bs, active)
        named = jax.jit(jax.vmap(lambda b, act: run(b, act, "v"), axis_name="v"))(bs, active)
        assert len(set(np.asarray(plain.n_iter)[:3].tolist())) > 1  # the members stopped at different iterations
        for field, p, q in zip(plain._fields, plain, named):
            np.testing.assert_allclose(q, p, rtol=1e-9, atol=1e-12, err_msg=field)
        one = jax.jit(run)(bs[0], True)
        np.testing.assert_allclose(named.x[0], one.x, rtol=1e-9, atol=1e-12)
        assert int(named.func_evals[0]) == int(one.func_evals)
        after_first = jax.jit(run)(bs[3], False)  # member 3 made the first update only
        np.testing.assert_allclose(named.x[3], after_first.x, rtol=1e-9, atol=1e-12)
        assert int(named.n_iter[3]) == int(after_first.n_iter) and int(named.func_evals[3]) == int(after_first.func_evals)


def test_axis_name_skips_the_batch_evaluation_no_member_makes():
    """Under a plain vmap the inner loop's cond on the batched ``do_eval`` is a select: the closure runs
    for the whole batch at every iteration, also the last, which ends on max_iter and evaluates for
    nobody. With the axis named it runs only where some member evaluates: here max_iter = 4 iterations
    of which 3 evaluate (the 4th ends the step), for both members, so 3 batched calls instead of 4."""
    calls = []
    a = jnp.asarray(np.diag(np.linspace(1.0, 4.0, 6)))
    bs = jnp.asarray(np.random.default_rng(4).normal(size=(2, 6)), jnp.float32)
    cfg = lbfgs.TorchLBFGSConfig(max_iter=4, tolerance_grad=0.0, tolerance_change=0.0)

    def run(b, axis_name=None):
        def vg(x):
            jax.debug.callback(lambda: calls.append(1))  # no batched argument: once per batched evaluation
            return _quadratic(a, b)(x)

        s = lbfgs.init(jnp.zeros(6), cfg)
        value, grad = _quadratic(a, b)(s.x)  # the step's first evaluation, given: not counted
        return lbfgs.update(s, vg, cfg, value, grad, axis_name=axis_name)[0]

    counted = {}
    for name, fn in (("plain", jax.vmap(run)), ("named", jax.vmap(lambda b: run(b, "v"), axis_name="v"))):
        calls.clear()
        state = jax.block_until_ready(jax.jit(fn)(bs))
        jax.effects_barrier()
        counted[name] = len(calls)
        assert np.asarray(state.n_iter).tolist() == [4, 4] and np.asarray(state.func_evals).tolist() == [4, 4]
    assert counted == {"plain": 4, "named": 3}


def test_matches_torch_optim_lbfgs():
    torch = pytest.importorskip("torch", reason="the optional 'bench' extra (torch) is not installed")
    rng = np.random.default_rng(2)
    n = 6
    a = rng.normal(size=(n, n))
    a = a @ a.T / n + 0.1 * np.eye(n)
    b = rng.normal(size=n)
    x0 = 2 * rng.normal(size=n)
    cfg = lbfgs.TorchLBFGSConfig(max_iter=3, history_size=2)
    xt = torch.tensor(x0.copy(), requires_grad=True)
    opt = torch.optim.LBFGS([xt], lr=cfg.lr, max_iter=cfg.max_iter, history_size=cfg.history_size)
    at, bt = torch.tensor(a), torch.tensor(b)

    def closure():
        opt.zero_grad()
        loss = 0.5 * xt @ at @ xt - bt @ xt + 0.1 * torch.sum(xt**4)
        loss.backward()
        return loss

    with jax.enable_x64(True):
        vg = jax.value_and_grad(lambda x: 0.5 * x @ jnp.asarray(a) @ x - jnp.asarray(b) @ x + 0.1 * jnp.sum(x**4))
        state = lbfgs.init(jnp.asarray(x0), cfg)
        for _ in range(5):
            loss_t = float(opt.step(closure).detach())  # the first closure value, as torch returns it
            state, loss_j = lbfgs.update(state, vg, cfg)
            np.testing.assert_allclose(float(loss_j), loss_t, rtol=1e-12)
            np.testing.assert_allclose(np.asarray(state.x), xt.detach().numpy(), rtol=1e-10, atol=1e-12)
            assert int(state.func_evals) == opt.state[xt]["func_evals"]
            assert int(state.n_iter) == opt.state[xt]["n_iter"]


def test_bad_input():
    with pytest.raises(ValueError, match="x0 must be a flat vector"):
        lbfgs.init(jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match="history_size"):
        lbfgs.TorchLBFGSConfig(history_size=0)


# ---------------------------------------------------------------- a per-step learning rate (LR schedules)


def _torch_lbfgs_reference(value_and_grad, x0, lrs, max_iter, max_eval, history_size=100, tolerance_grad=1e-7,
                           tolerance_change=1e-9):
    """``torch.optim.LBFGS`` (no line search) written out in numpy, ``group['lr'] = lrs[k]`` for the k-th ``step``.

    An independent transcription of PyTorch's ``lbfgs.py`` (ALGORITHMS.md §2.3): the state (``d``, ``t``,
    history, ``H_diag``, previous gradient and loss, ``n_iter``) persists across ``step`` calls, as it does
    when a scheduler changes the learning rate between them. Returns the iterate after every step,
    ``func_evals`` and ``n_iter``.
    """
    x = np.array(x0, dtype=np.float64)
    n_iter, func_evals, d, t, prev_g, prev_loss = 0, 0, None, None, None, None
    old_dirs, old_stps, ro, h_diag = [], [], [], 1.0
    xs = []
    for lr in lrs:
        loss, g = value_and_grad(x)
        func_evals += 1
        current_evals = 1
        if np.max(np.abs(g)) <= tolerance_grad:
            xs.append(x.copy())
            continue
        k = 0
        while k < max_iter:
            k += 1
            n_iter += 1
            if n_iter == 1:
                d, old_dirs, old_stps, ro, h_diag = -g, [], [], [], 1.0
            else:
                y, s = g - prev_g, d * t
                ys = y @ s
                if ys > 1e-10:
                    if len(old_dirs) == history_size:
                        old_dirs.pop(0), old_stps.pop(0), ro.pop(0)
                    old_dirs.append(y), old_stps.append(s), ro.append(1.0 / ys)
                    h_diag = ys / (y @ y)
                q, al = -g, [0.0] * len(old_dirs)
                for i in reversed(range(len(old_dirs))):
                    al[i] = (old_stps[i] @ q) * ro[i]
                    q = q - al[i] * old_dirs[i]
                d = q * h_diag
                for i in range(len(old_dirs)):
                    d = d + old_stps[i] * (al[i] - (old_dirs[i] @ d) * ro[i])
            prev_g, prev_loss = g.copy(), loss
            t = min(1.0, 1.0 / np.sum(np.abs(g))) * lr if n_iter == 1 else lr
            if g @ d > -tolerance_change:
                break
            x = x + t * d
            opt_cond = False
            if k != max_iter:
                loss, g = value_and_grad(x)
                func_evals += 1
                current_evals += 1
                opt_cond = np.max(np.abs(g)) <= tolerance_grad
            if k == max_iter or current_evals >= max_eval or opt_cond:
                break
            if np.max(np.abs(d * t)) <= tolerance_change or abs(loss - prev_loss) < tolerance_change:
                break
        xs.append(x.copy())
    return xs, func_evals, n_iter


def _quartic(a, c):
    return lambda x: 0.5 * (x - c) @ a @ (x - c) + 0.1 * jnp.sum((x - c) ** 4)


def test_lr_argument_defaults_to_the_config():
    """``lr=None`` is ``config.lr``; an explicit ``lr`` equal to it, or to another config's, changes nothing (bitwise)."""
    with jax.enable_x64(True):
        vg = jax.value_and_grad(_quartic(jnp.diag(jnp.array([1.0, 2.0, 5.0])), jnp.array([0.5, -1.0, 2.0])))
        runs = {}
        for name, cfg, lr in [("default", lbfgs.TorchLBFGSConfig(max_iter=4), None),
                              ("explicit", lbfgs.TorchLBFGSConfig(max_iter=4), jnp.asarray(1.0)),
                              ("half_cfg", lbfgs.TorchLBFGSConfig(max_iter=4, lr=0.5), None),
                              ("half_arg", lbfgs.TorchLBFGSConfig(max_iter=4), 0.5)]:
            state = lbfgs.init(jnp.zeros(3), cfg)
            for _ in range(3):
                state, _ = lbfgs.update(state, vg, cfg, lr=lr)
            runs[name] = np.asarray(state.x)
        np.testing.assert_array_equal(runs["explicit"], runs["default"])
        np.testing.assert_array_equal(runs["half_arg"], runs["half_cfg"])
        assert not np.array_equal(runs["half_arg"], runs["default"])


def test_per_step_lr_matches_the_torch_rule():
    """A learning rate changed between step calls (MultiStepLR) follows PyTorch: history, d and t persist."""
    rng = np.random.default_rng(5)
    n = 6
    q = rng.normal(size=(n, n))
    a, c = q @ q.T / n + 0.2 * np.eye(n), rng.normal(size=n)
    x0 = c + 2 * rng.normal(size=n)
    lrs = [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    cfg = lbfgs.TorchLBFGSConfig(max_iter=3, history_size=4)
    with jax.enable_x64(True):
        vg = jax.value_and_grad(_quartic(jnp.asarray(a), jnp.asarray(c)))
        ref_vg = lambda x: tuple(np.asarray(v) for v in vg(jnp.asarray(x)))
        ref, ref_evals, ref_iter = _torch_lbfgs_reference(ref_vg, x0, lrs, cfg.max_iter, cfg.eval_budget, cfg.history_size)
        step = jax.jit(lambda s, lr: lbfgs.update(s, vg, cfg, lr=lr)[0])
        state = lbfgs.init(jnp.asarray(x0), cfg)
        for k, lr in enumerate(lrs):
            state = step(state, lr)
            np.testing.assert_allclose(np.asarray(state.x), ref[k], rtol=1e-10, atol=1e-12, err_msg=f"step {k}")
        assert int(state.func_evals) == ref_evals and int(state.n_iter) == ref_iter
        assert not np.allclose(ref[-1], _torch_lbfgs_reference(ref_vg, x0, [1.0] * 6, 3, cfg.eval_budget, 4)[0][-1])
