#!/usr/bin/env bash
# Issue 4's GPU checks as one command, for a session that is lent a GPU machine for a few minutes.
#
# It runs, each under its own time limit, writing as it goes to $OUT (at most 8 files come back):
#   1. the devices and versions;
#   2. bench_attack at V = 64 (GPU_V_SMALL) with the named victim axis (AttackConfig.victim_axis) against a plain vmap;
#   3. bench_attack at V = 1,024 (GPU_V_LARGE) (the goal: <= 30 s on one H100), with the fraction of peak FLOP/s;
#      both with --breakdown: before each attack, one batched objective evaluation and one outer L-BFGS step
#      timed apart (bench_attack.breakdown), so a slow run says whether the network or the optimiser is slow;
#   4. the iDLG reproduction on LFW (5,749 classes), 1,000 victims, for GPU_LFW_S seconds (default 120);
#   5. the iDLG reproduction on CIFAR-100 for GPU_CIFAR_S seconds, only when set: its 1,000 victims
#      ran on the CPU (docs/results/idlg_cifar100_cpu), LFW's would take ~9 h there;
#   6. only when GPU_VARIANTS_S is set: bench_attack at V = 64 over LeNet's heads (dense, blocked) and
#      convolutions (patches, s2d), the CPU defaults' variants, which no GPU has measured yet;
#   7. only when GPU_STREAM_S is set: bench_attack at V = 1,024 (GPU_V_LARGE) in chunks of GPU_SLOTS (default
#      512) against attack_victims' "stream" through as many slots (refilled as victims finish).
#
# The device machine has JAX with CUDA, flax, optax and chex but not dm-pix, and it cannot read
# ../shared/data. Prepare once here, in the repository root (neither is committed: both are ignored
# through .git/info/exclude; .devdata is a link, so no data file is copied into the checkout):
#
#   echo /.whl/ >> .git/info/exclude; echo /.devdata >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl dm-pix==0.4.5
#   ln -s "$(realpath ../shared/data)" .devdata
#
# then call the device tool's run with
#   command: bash experiments/gpu_session.sh
#   carry:   [".whl", ".devdata/cifar100_subset.npz", ".devdata/lfw32_subset.npz"]
#   timeout_s: 600
# Step limits (seconds) and sizes can be set in the command, e.g. GPU_CIFAR_S=240 bash experiments/gpu_session.sh;
# the default steps' limits add up to about 600 s, one call's limit, so run optional steps in a second call
# with GPU_ONLY naming the steps to run, e.g.
#   GPU_ONLY="env bench_stream bench_variants" GPU_STREAM_S=150 GPU_VARIANTS_S=200 bash experiments/gpu_session.sh
# a CPU smoke run of the script itself: GPU_CIFAR_S=30 GPU_V_SMALL=2 GPU_V_LARGE=2 GPU_REPRO_VICTIMS=2 GPU_STEPS=2 GPU_CIFAR_CHUNK=2 GPU_LFW_CHUNK=2 OUT=/tmp/o bash experiments/gpu_session.sh
set -u
OUT=${OUT:-/tmp/gpu_session_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAXLEAK_DATA=${JAXLEAK_DATA:-$PWD/.devdata}
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
LOG=$OUT/log.txt
step() {  # step NAME SECONDS COMMAND...: runs COMMAND under a limit, logging to $LOG (only NAMEs in GPU_ONLY, if set)
    local name=$1 limit=$2; shift 2
    if [ -n "${GPU_ONLY:-}" ] && [[ " $GPU_ONLY " != *" $name "* ]]; then return 0; fi
    echo "=== $name (limit ${limit}s) $(date -u +%T)" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG" | tail -n 40
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$LOG"
}

V_SMALL=${GPU_V_SMALL:-64} V_LARGE=${GPU_V_LARGE:-1024} N_REPRO=${GPU_REPRO_VICTIMS:-1000}
STEPS=${GPU_STEPS:+--steps $GPU_STEPS}  # unset: each script's default (the paper's 300)
step env 60 bash -c 'nvidia-smi -L; python3 -c "import jax, flax, optax, dm_pix; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())"'
step bench_small "${GPU_BENCH_SMALL_S:-180}" python3 experiments/bench_attack.py --victims "$V_SMALL" --strategies vmap vmap-plain \
    --torch-victims 0 $STEPS --breakdown --out "$OUT/bench_small.json"
step bench_large "${GPU_BENCH_LARGE_S:-200}" python3 experiments/bench_attack.py --victims "$V_LARGE" --strategies vmap \
    --torch-victims 0 $STEPS --breakdown --out "$OUT/bench_large.json"
if [ "${GPU_VARIANTS_S:-0}" -gt 0 ]; then
    step bench_variants "$GPU_VARIANTS_S" python3 experiments/bench_attack.py --victims "$V_SMALL" --strategies vmap \
        --heads dense blocked --convs patches s2d --torch-victims 0 $STEPS --out "$OUT/bench_variants.json"
fi
if [ "${GPU_STREAM_S:-0}" -gt 0 ]; then
    step bench_stream "$GPU_STREAM_S" python3 experiments/bench_attack.py --victims "$V_LARGE" --strategies vmap-chunks \
        stream --slots "${GPU_SLOTS:-512}" --torch-victims 0 $STEPS --out "$OUT/bench_stream.json"
fi
for ds in lfw cifar100; do
    if [ "$ds" = cifar100 ]; then limit=${GPU_CIFAR_S:-0} chunk=${GPU_CIFAR_CHUNK:-256}; else limit=${GPU_LFW_S:-120} chunk=${GPU_LFW_CHUNK:-64}; fi
    [ "$limit" -gt 0 ] || continue
    # --time-budget stops starting chunks; the limit beyond it lets the running chunk finish.
    step "idlg_$ds" $((limit + 60)) python3 experiments/idlg_reproduction.py --dataset "$ds" --victims "$N_REPRO" \
        --chunk "$chunk" $STEPS --out "/tmp/idlg_$ds" --time-budget "$limit" --quiet
    for f in results.json victims.jsonl; do
        [ -f "/tmp/idlg_$ds/$f" ] && cp "/tmp/idlg_$ds/$f" "$OUT/idlg_${ds}_$f"
    done
done
echo "=== done $(date -u +%T)" | tee -a "$LOG"
