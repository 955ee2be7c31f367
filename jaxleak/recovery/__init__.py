"""Analytic read-outs from the last layer's gradient: iDLG labels, soft labels and features.

One victim, one example (B = 1), cross-entropy with a label distribution ``y``.
In flax layout the last layer is ``z = h @ W (+ b)`` with ``W`` ``(d, K)``, so its
gradient is ``G = outer(h, delta)`` ``(d, K)`` with ``delta = p - y`` and, with a
bias, ``db = delta`` (ALGORITHMS.md §1).

* :func:`idlg_label` — iDLG (Zhao, Mopuri, Bilen 2020): the class of a one-hot
  label is the only one with a negative ``delta``.
* :func:`soft_label` — Wang, Liang, He (ICLR 2024): label smoothing / mixup
  labels and the feature ``h``. Column ``r`` of ``G`` gives ``h = lam * G[:, r]``
  with ``lam = 1 / delta_r`` unknown; every ``lam`` yields a candidate
  ``(h_hat, y_hat)`` reproducing ``G`` exactly (Theorem 1,
  :func:`pseudo_label`), and ``lam`` is fixed by the label's parametric form
  (the variance criterion, §4.5).

Everything is a pure function of arrays, jit-compiled and vmappable; arrays
with a leading victim axis ``(V, d, K)`` are mapped automatically. The search
runs in the dtype of its inputs (cast to float64 under
``jax.enable_x64(True)`` for the tightest results).

Where things live (private modules; import from :mod:`jaxleak.recovery`):

* ``_core`` — :data:`REASONS` and the input checks, :func:`pseudo_label`,
  :func:`variance_loss`, the validity checks and :class:`SoftLabel`;
* ``_idlg`` — :func:`idlg_label`;
* ``_robust`` — :class:`RobustSearch`: the closed form with a bias gradient
  and jaxleak's bounded search on ``u = 1 / lam``;
* ``_paper`` — :class:`PaperSearch`: the reference L-BFGS flip/skip + particle
  swarm (:func:`swarm_windows`);
* ``_soft_label`` — :func:`soft_label`, which checks its arguments and
  dispatches to one of the above under ``jit``/``vmap``.

Layers are one-way: every private module builds on ``_core``; none imports
this package's ``__init__``.
"""

from jaxleak.recovery._core import (
    AMBIGUOUS,
    IDLG_METHODS,
    KINDS,
    NO_SOLUTION,
    NON_FINITE,
    OK,
    RANK_GT_1,
    REASONS,
    SEARCHES,
    ZERO_GRADIENT,
    SoftLabel,
    gradient_reason,
    pseudo_label,
    variance_loss,
)
from jaxleak.recovery._idlg import idlg_label
from jaxleak.recovery._paper import PaperSearch, swarm_windows
from jaxleak.recovery._robust import RobustSearch
from jaxleak.recovery._soft_label import soft_label

__all__ = (
    "AMBIGUOUS",
    "IDLG_METHODS",
    "KINDS",
    "NO_SOLUTION",
    "NON_FINITE",
    "OK",
    "RANK_GT_1",
    "REASONS",
    "SEARCHES",
    "ZERO_GRADIENT",
    "PaperSearch",
    "RobustSearch",
    "SoftLabel",
    "gradient_reason",
    "idlg_label",
    "pseudo_label",
    "soft_label",
    "swarm_windows",
    "variance_loss",
)
