"""Where an iDLG attack's time goes on this backend: an XLA trace of one victim's attack, per kernel.

Compiles the iDLG attack (CIFAR-100 LeNet, the paper's L-BFGS) for one victim of
``bench_attack.py``'s set, runs it ``--reps`` times under ``jax.profiler``, reads
the trace back with ``xprof`` (the optional ``profile`` extra) and adds up each
kernel's time, per objective evaluation. Kernels are attributed by their HLO
``op_name``: ``objective`` (the matching objective and its derivatives: the
network's ops, ``jvp``/``transpose``), ``lbfgs`` (the rest of the inner L-BFGS
loop), ``outer`` (the rest of the outer step loop) and ``unattributed`` (kernels
whose HLO carries no ``op_name``, such as some of XLA's own dots). The tracer adds
a fixed cost to every kernel, so the shares matter, not the absolute times.

    pip install -e ".[profile]"
    python experiments/profile_attack.py --steps 20 --top 25
    python experiments/profile_attack.py --conv slices --head dense
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import pathlib
import re
import sys
import tempfile

import jax

from jaxleak import attacks, models
from jaxleak.cli import ScriptOutput, add_output_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _xla import default_data_dir  # noqa: E402
from bench_attack import make_victims  # noqa: E402

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (\S+) .*?op_name="([^"]*)"', re.M)


def category(op_name: str) -> str:
    """``objective``, ``lbfgs``, ``outer`` or ``unattributed`` for a kernel's HLO ``op_name`` (see the module docstring)."""
    if not op_name:
        return "unattributed"
    if "LeNet" in op_name or "jvp(" in op_name or "transpose(" in op_name:
        return "objective"
    return "lbfgs" if "/while/body/while/body/" in op_name else "outer"


def kernel_times(trace_dir: str) -> collections.Counter:
    """Total microseconds per kernel name in the ``jax.profiler`` trace under ``trace_dir``."""
    from xprof.convert import raw_to_tool_data

    path = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]
    data, _ = raw_to_tool_data.xspace_to_tool_data([path], "trace_viewer", {})
    events = json.loads(data if isinstance(data, str) else data.decode())["traceEvents"]
    times = collections.Counter()
    for e in events:
        name = e.get("name", "")
        # Kernels only: not the runtime's spans (Executor::..., PjitFunction, ...), Python frames or loop containers.
        if e.get("ph") != "X" or name.startswith(("$", "while", "cond", "Pjit")) or "::" in name or "Executable" in name:
            continue
        times[name] += e.get("dur", 0)
    return times


def profile(conv: str, head: str, steps: int, reps: int, data: pathlib.Path) -> dict:
    """Traces ``reps`` runs of victim 0's ``steps``-step iDLG attack; kernel time per evaluation, by category and kernel."""
    _, params, grads, _, _ = make_victims(data, 1, 0)
    first = lambda t: jax.tree_util.tree_map(lambda a: a[0], t)
    args = (jax.random.split(jax.random.PRNGKey(1), 1)[0], first(params), first(grads))  # bench_attack's victim 0
    model = models.LeNet(100, conv=conv, head=head)
    config = attacks.AttackConfig(steps=steps)
    compiled = jax.jit(lambda k, p, g: attacks.idlg(k, model.apply, p, g, (32, 32, 3), config=config)).lower(*args).compile()
    evals = int(jax.block_until_ready(compiled(*args)).evals)
    hlo = {m.group(1): (m.group(2), m.group(3)) for m in _INSTRUCTION.finditer(compiled.as_text())}
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(reps):
            out = compiled(*args)
        jax.block_until_ready(out)
        jax.profiler.stop_trace()
        times = kernel_times(trace_dir)
    per_eval = lambda us: us / reps / evals
    kernels, shares = [], collections.Counter()
    for name, us in times.most_common():
        shape, op_name = hlo.get(name, ("", ""))
        kernels.append({"kernel": name, "us_per_eval": per_eval(us), "shape": shape, "category": category(op_name),
                        "op_name": op_name})
        shares[kernels[-1]["category"]] += us
    total = sum(shares.values())
    return {"conv": conv, "head": head, "steps": steps, "evals": evals, "reps": reps, "us_per_eval": per_eval(total),
            "categories": {c: {"us_per_eval": per_eval(us), "share": us / total} for c, us in shares.most_common()},
            "kernels": kernels}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conv", default="auto", choices=models.CONVS, help="LeNet's convolution (default: the backend's)")
    p.add_argument("--head", default="auto", choices=models.HEADS, help="LeNet's head (default: the backend's)")
    p.add_argument("--steps", type=int, default=20, help="outer L-BFGS steps of the traced attack (default 20)")
    p.add_argument("--reps", type=int, default=3, help="traced runs of the attack (default 3)")
    p.add_argument("--top", type=int, default=25, help="kernels to list (default 25)")
    p.add_argument("--data", type=pathlib.Path, default=None,
                   help="folder of cifar100_subset.npz (default $JAXLEAK_DATA, else ../shared/data beside the checkout)")
    add_output_flags(p)
    args = p.parse_args(argv)
    o = ScriptOutput(args)
    try:
        import xprof  # noqa: F401
    except ImportError:
        p.error("needs xprof to read the trace: pip install -e '.[profile]'")
    data = args.data or default_data_dir()
    if not (data / "cifar100_subset.npz").is_file():
        p.error(f"cifar100_subset.npz not found in {data}: pass --data or set JAXLEAK_DATA")
    res = profile(args.conv, args.head, args.steps, args.reps, data)
    o.report(f"{res['evals']} evaluations, {res['us_per_eval']:.0f} us of kernels per evaluation (traced)")
    for c, v in res["categories"].items():
        o.report(f"  {c:13s} {v['us_per_eval']:7.1f} us/eval  {100 * v['share']:4.1f} %")
    for k in res["kernels"][:args.top]:
        o.report(f"  {k['us_per_eval']:7.2f}  {k['category']:12s} {k['kernel']:34s} {k['shape'][:26]:26s} {k['op_name'][-70:]}")
    o.summary({"experiment": "profile_attack", **{k: v for k, v in res.items() if k != "kernels"},
               "kernels": res["kernels"][:args.top]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
