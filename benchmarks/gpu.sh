#!/usr/bin/env bash
# On a lent GPU, in one command bounded to BUDGET_S (8 minutes): the CUDA tests, both benchmarks against plain
# MONAI, a time-limited training run, the same on one GPU under torchrun (NCCL), and serve.py under load; each
# step's output in $OUT/<step>.txt, its status and seconds in $OUT/steps.txt.
#
#   bash ../shared/gpu/wheels.sh          # here, once: monai, nibabel, SimpleITK wheels into .whl/ (56 MB)
#   device run, carry [".whl"]:  bash benchmarks/gpu.sh
#
# The data is made on the machine (synthetic CT, 512×512 in-plane as the seed project's, 64 slices), so that
# nothing but the wheels travels. DEVICE=cpu with small sizes (tests/test_benchmarks.py) smoke-runs the script
# without a GPU. A step that fails or runs out of its share of the time lets the others run, then fails the script.
set -euo pipefail
OUT=${OUT:-output/gpu}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-460}   # the whole script (8 minutes with a step's kill grace), the device's start-up aside
CAP_SCALE=${CAP_SCALE:-1}   # each step's cap × this (a slow CPU standing in for the GPU)
TRAIN_LIMIT=${TRAIN_LIMIT:-60s}  # train.py --time-limit of the run whose checkpoint bench_infer and serve use
TRAIN_EPOCHS=${TRAIN_EPOCHS:-200}
BENCH_EPOCHS=${BENCH_EPOCHS:-6}   # interleaved epochs of each way in bench_train
CASES=${CASES:-12}
SHAPE=${SHAPE:-64 512 512}  # raw synthetic volumes, D H W
REPEATS=${REPEATS:-3}      # interleaved repeats per case in bench_infer
NET=${NET:-}                # train.py's network and crop arguments; empty: the plan's
TESTS=${TESTS:-1}          # 0: leave out the tests (the smoke run in tests/test_benchmarks.py)
DATA=${DATA:-/tmp/gpu-bench}
mkdir -p "$OUT"
: > "$OUT/steps.txt"
START=$SECONDS
failed=()

# step NAME CAP_S COMMAND...: COMMAND, its output in $OUT/NAME.txt, stopped after CAP_S seconds or what is left of
# the budget, whichever is less; its status and seconds in $OUT/steps.txt
step() {
    local name=$1 cap=$(($2 * CAP_SCALE)) rc=0 t0=$SECONDS
    shift 2
    local left=$((BUDGET_S - (SECONDS - START)))
    if (( cap > left )); then cap=$left; fi
    if (( cap < 5 )); then
        echo "$name: not run, the budget is spent" | tee -a "$OUT/steps.txt"
        failed+=("$name")
        return 0
    fi
    timeout --kill-after=10 "$cap" "$@" > "$OUT/$name.txt" 2>&1 || rc=$?
    tail -3 "$OUT/$name.txt"
    echo "$name: exit $rc in $((SECONDS - t0)) s (at most $cap s)" | tee -a "$OUT/steps.txt"
    if (( rc != 0 )); then failed+=("$name"); fi
    return 0
}

if [ -d .whl ] && ! $PY -c "import monai, nibabel, SimpleITK" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>/dev/null \
    || echo "no GPU"
  nproc; $PY -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__)"; } \
    | tee "$OUT/machine.txt"

# 1. the CUDA-only paths, for real (skipped without a GPU); the rest of the suite is CI's, on the CPU
if [ "$TESTS" = 1 ]; then
    step pytest 90 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py
fi

# 2. data: synthetic CT volumes, prepared to 64×256×256
step preprocess 60 $PY preprocess.py "$DATA/raw" "$DATA/prep" --synthetic "$CASES" --synthetic-shape $SHAPE --seed 0

# 3. training speed: plain Dataset + DataLoader (4 workers), fp32, against train.py's path, the plan's network
step bench_train 90 $PY benchmarks/bench_train.py --epochs "$BENCH_EPOCHS" --json "$OUT/bench_train.json" -- \
    --data "$DATA/prep" --device "$DEVICE" --epochs 200 --num-workers 4 $NET

# 4. a time-limited run (the plan, the measured loader workers and validation schedule, the decision after it),
#    then inference speed with its checkpoint: plain sliding_window_inference against infer.py's
step train 120 $PY train.py --data "$DATA/prep" --output "$OUT/train" --epochs "$TRAIN_EPOCHS" --device "$DEVICE" \
    --time-limit "$TRAIN_LIMIT" $NET
step bench_infer 60 $PY benchmarks/bench_infer.py --prep "$DATA/prep" --checkpoint "$OUT/train/best.pt" \
    --device "$DEVICE" --repeats "$REPEATS" --json "$OUT/bench_infer.json"

# 5. one GPU as a torchrun job: every collective on the process group's device (NCCL on a GPU, gloo on the CPU)
step torchrun 60 $PY -m torch.distributed.run --standalone --nproc_per_node 1 train.py --data "$DATA/prep" \
    --output "$OUT/torchrun" --epochs 2 --device "$DEVICE" --no-postprocess $NET
backend=$([ "$DEVICE" = cuda ] && echo nccl || echo gloo)
if ! grep -q "rank 0 of 1 ($backend)" "$OUT/torchrun.txt"; then
    echo "torchrun: no rank joined a $backend group" | tee -a "$OUT/steps.txt"
    failed+=(torchrun_backend)
fi

# 6. serve.py on the device under load: one client, then four at once, each sending a raw volume
step bench_serve 60 $PY benchmarks/bench_serve.py --checkpoint "$OUT/train/model.pt" \
    --image "$(ls "$DATA"/raw/*.nii.gz | head -1)" --requests 4 --clients 1 4 --device "$DEVICE" \
    --json "$OUT/bench_serve.json"

rm -f "$OUT/train/last.pt" "$OUT/torchrun/last.pt"  # the best checkpoint is enough to bring back
echo "gpu.sh: $((SECONDS - START)) s in all" | tee -a "$OUT/steps.txt"
if (( ${#failed[@]} )); then
    echo "failed: ${failed[*]} (see $OUT/steps.txt)" >&2
    exit 1
fi
