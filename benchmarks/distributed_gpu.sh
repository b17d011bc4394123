#!/usr/bin/env bash
# Multi-process engines on GPUs (issue 11), one command, under 5 minutes: with NCCL on every visible GPU (NPROC=...),
#   1. parity of R2Trainer against one process at the same global batch (3 steps, tiny BERT, soft-min-max R²,
#      GA 1 and 2): DDP, FSDP2 and FSDP1 (use_orig_params) through Accelerate (tests/scripts/train_parity.py +
#      distributed_gpu.py compare);
#   2. range loss and gradients of every r2_type (scalar and 2-dim, GA 1 and 2) and DKM against one process under DDP,
#      FSDP2 and FSDP1 with use_orig_params (tests/scripts/fsdp_parity.py);
#   3. R2Trainer step time and peak CUDA memory per engine (DDP, FSDP2, FSDP1, and DeepSpeed ZeRO-3 when deepspeed
#      imports; ZeRO-3 with R² is refused by R2Trainer, so it is timed with r2_type=none), BERT-base from its config,
#      8 x 128 tokens per GPU, r2_type none vs soft_min_max.
#
#   bash benchmarks/distributed_gpu.sh               # results in $OUT (the device machine's folder) or outputs/distributed_gpu/
#   DEVICE=cpu bash benchmarks/distributed_gpu.sh    # the same steps on 2 CPU processes (gloo, tiny model): a smoke run
#
# One GPU: NCCL refuses two ranks on one device, so everything runs as 1 process (the sharded code paths run, the
# cross-rank parity is not checked; the summary says so). No GPU: it stops at once with a message (exit 2).
# Nothing is installed: it uses whatever `python3` holds a CUDA torch and transformers (PYTHON=... to choose) and this
# checkout's hf_r2. A failing part does not stop the others; the exit status is 1 if a parity check failed or was
# skipped for lack of time.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
RESULTS=${OUT:-outputs/distributed_gpu}
BUDGET=${BUDGET:-280}  # seconds for all parts: a part is cut at the budget, a later one skipped (both reported)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
START=$SECONDS

if [ "$DEVICE" = cuda ]; then
    NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null)
    if [ "${NGPU:-0}" -lt 1 ] 2>/dev/null || [ -z "${NGPU:-}" ]; then
        echo "distributed_gpu.sh: no CUDA GPU visible to $PY (torch.cuda.is_available() is False or torch is" \
            "missing). This script needs NVIDIA GPUs and NCCL. For a CPU smoke run of the same steps:" \
            "DEVICE=cpu bash benchmarks/distributed_gpu.sh" >&2
        exit 2
    fi
    NPROC=${NPROC:-$((NGPU > 8 ? 8 : NGPU))}
    MODEL=base
else
    NPROC=${NPROC:-2}
    MODEL=tiny
fi
mkdir -p "$RESULTS"
case $NPROC in 1 | 2 | 4 | 8) ;; *) echo "NPROC must be 1, 2, 4 or 8 (the global batch of 8 is split evenly), got $NPROC" >&2; exit 2 ;; esac
PER=$((8 / NPROC))
LAYOUTS="${PER}x1"
[ "$PER" -ge 2 ] && LAYOUTS="$LAYOUTS $((PER / 2))x2"
LAUNCH=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC")
FAILED=0

part() {  # part NAME TIMEOUT COMMAND...: runs, logs into $RESULTS/NAME.txt, notes a failure
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -le 5 ]; then
        echo "== $name SKIPPED: the ${BUDGET}s budget is spent" | tee "$RESULTS/$name.txt"
        FAILED=1  # not checked is not passed
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left  # no part runs past the budget: the whole stays under 5 minutes
    echo "== $name: $*"
    timeout "$limit" "$@" >"$RESULTS/$name.txt" 2>&1
    local status=$?
    grep -E "^(parity|step|ok$)" "$RESULTS/$name.txt"
    if [ "$status" -ne 0 ]; then
        echo "== $name FAILED (exit $status; last lines of $RESULTS/$name.txt:)"
        tail -n 15 "$RESULTS/$name.txt"
        FAILED=1
    fi
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'nccl', torch.cuda.nccl.version() if torch.cuda.is_available() else None, 'transformers', transformers.__version__, \
'accelerate', accelerate.__version__)"
    "$PY" -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>/dev/null || echo "deepspeed: not importable (ZeRO-3 part skipped)"
    echo "device $DEVICE, $NPROC process(es), layouts $LAYOUTS"
    [ "$NPROC" -eq 1 ] && echo "ONE PROCESS: NCCL allows one rank per GPU, so the cross-rank parity below is not checked"
} 2>&1 | tee "$RESULTS/env.txt"

# 1. R2Trainer parity (tiny BERT, 3 steps): one process, then DDP, FSDP2 and FSDP1 with $NPROC processes
part ref 120 "$PY" tests/scripts/train_parity.py --out "$RESULTS/ref.pt" --layouts 8x1 --steps 3 --device "$DEVICE"
for engine in ddp fsdp2 fsdp1; do
    flag=()
    [ "$engine" = ddp ] || flag=("--$engine")
    # shellcheck disable=SC2086  # LAYOUTS is a list of words
    part "$engine" 120 "${LAUNCH[@]}" tests/scripts/train_parity.py --out "$RESULTS/$engine.pt" --layouts $LAYOUTS \
        --steps 3 --device "$DEVICE" "${flag[@]}"
done
part parity 60 "$PY" benchmarks/distributed_gpu.py compare --ref "$RESULTS/ref.pt" \
    --run "ddp=$RESULTS/ddp.pt" "fsdp2=$RESULTS/fsdp2.pt" "fsdp1=$RESULTS/fsdp1.pt"

# 2. Range loss, gradients and DKM against one process, inside each process (prints "ok")
part grads 180 "${LAUNCH[@]}" tests/scripts/fsdp_parity.py --engine ddp fsdp2 fsdp1 --device "$DEVICE"

# 3. Step time and peak memory per engine (timings are not parity: a failure here is reported, not counted)
PARITY_FAILED=$FAILED
for engine in ddp fsdp2 fsdp1 zero3; do
    if [ "$engine" = zero3 ] && ! "$PY" -c "import deepspeed" 2>/dev/null; then
        echo "== step_zero3 SKIPPED: deepspeed does not import" | tee "$RESULTS/step_zero3.txt"
        continue
    fi
    part "step_$engine" 120 "${LAUNCH[@]}" benchmarks/distributed_gpu.py step --engine "$engine" --device "$DEVICE" --model "$MODEL"
done

echo
echo "== summary ($RESULTS, $((SECONDS - START)) s)"
cat "$RESULTS/env.txt"
grep -hE "^(parity|step)|SKIPPED|FAILED" "$RESULTS"/*.txt
if grep -qx ok "$RESULTS/grads.txt" 2>/dev/null; then echo "grads (ddp fsdp2 fsdp1): ok"; else echo "grads: NOT ok"; fi
exit "$PARITY_FAILED"
