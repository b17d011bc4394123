#!/usr/bin/env bash
# The GPU suite, one command (issue 13): R² step overhead for every r2_type (plain loop and R2Trainer), then DKM step
# time and peak memory against a plain step (and against coremltools' DKMPalettizer where it is installed) for the
# scalar and vector cases, each ratio measured side by side in one process. Under 5 minutes on one H100/H200.
#
#   bash benchmarks/gpu.sh                 # results in $OUT (the device machine's folder) or outputs/gpu/
#   DEVICE=cpu STEPS=1 CASES=2x1 bash benchmarks/gpu.sh   # a smoke run of the same script without a GPU
#
# It uses whatever `python3` holds a CUDA torch and transformers (PYTHON=... to choose) and imports hf_r2 from this
# checkout: nothing is installed, so it runs on a machine without network. One failing step does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-20}
CASES=${CASES:-2x1 4x1 2x2 4x4}
RESULTS=${OUT:-outputs/gpu}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1

run() {
    local name=$1
    shift
    echo "== $name: $PY $*"
    timeout 150 "$PY" "$@" 2>&1 | tee "$RESULTS/$name.txt"
    local status=${PIPESTATUS[0]}
    [ "$status" -eq 0 ] || echo "== $name FAILED (exit $status)" | tee -a "$RESULTS/$name.txt"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
} 2>&1 | tee "$RESULTS/env.txt"

run r2_loop benchmarks/r2_overhead.py --device "$DEVICE" --steps "$STEPS" --warmup 3
run r2_trainer benchmarks/r2_overhead.py --device "$DEVICE" --mode trainer --steps "$STEPS" --warmup 3
# shellcheck disable=SC2086  # CASES is a list of words
run dkm benchmarks/dkm.py --device "$DEVICE" --steps "$STEPS" --cases $CASES

echo
echo "== summary ($RESULTS)"
cat "$RESULTS/env.txt"
for name in r2_loop r2_trainer; do
    echo "--- $name"
    sed -n '/^mode /,$p' "$RESULTS/$name.txt"
    grep "FAILED" "$RESULTS/$name.txt"
done
echo "--- dkm"
sed -n '/^plain step/,$p' "$RESULTS/dkm.txt"
grep "FAILED" "$RESULTS/dkm.txt"
exit 0
