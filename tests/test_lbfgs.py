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
            loss_t = float(opt.step(closure))
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
