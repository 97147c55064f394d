#!/usr/bin/env bash
# On a lent GPU, in one command: the CUDA tests, then both benchmarks against plain MONAI; results in $OUT.
#
#   bash ../shared/gpu/wheels.sh          # here, once: monai, nibabel, SimpleITK wheels into .whl/ (56 MB)
#   device run, carry [".whl"]:  bash benchmarks/gpu.sh
#
# The data is made on the machine (synthetic CT, 512×512 in-plane as the seed project's, 64 slices), so that
# nothing but the wheels travels. DEVICE=cpu with small sizes (tests/test_benchmarks.py) smoke-runs the script without a GPU.
set -euo pipefail
OUT=${OUT:-output/gpu}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
TRAIN_EPOCHS=${TRAIN_EPOCHS:-40}  # the checkpoint bench_infer times
BENCH_EPOCHS=${BENCH_EPOCHS:-6}   # interleaved epochs of each way in bench_train
CASES=${CASES:-12}
SHAPE=${SHAPE:-64 512 512}  # raw synthetic volumes, D H W
REPEATS=${REPEATS:-3}      # interleaved repeats per case in bench_infer
NET=${NET:-}                # train.py's network and crop arguments; empty: the defaults (16–256 channels, 48×96×96)
TESTS=${TESTS:-1}          # 0: leave out the tests (the smoke run in tests/test_benchmarks.py)
DATA=${DATA:-/tmp/gpu-bench}
mkdir -p "$OUT"

if [ -d .whl ] && ! $PY -c "import monai, nibabel, SimpleITK" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  nproc; $PY -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__)"; } \
    | tee "$OUT/machine.txt"

# 1. the CUDA-only paths, for real (skipped without a GPU), and the pipeline tests on this machine's torch; a
#    failure still lets the benchmarks run, then fails the script at the end
tests_status=0
if [ "$TESTS" = 1 ]; then
    $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_pipeline.py > "$OUT/pytest.txt" 2>&1 \
        || tests_status=$?
    tail -3 "$OUT/pytest.txt"
fi

# 2. data: synthetic CT volumes, prepared to 64×256×256
$PY preprocess.py "$DATA/raw" "$DATA/prep" --synthetic "$CASES" --synthetic-shape $SHAPE --seed 0 \
    2>&1 | tail -2 | tee "$OUT/preprocess.txt"

# 3. training speed: plain Dataset + DataLoader (4 workers), fp32, against train.py's path; default network, crops
$PY benchmarks/bench_train.py --epochs "$BENCH_EPOCHS" --json "$OUT/bench_train.json" -- \
    --data "$DATA/prep" --device "$DEVICE" --epochs 200 --num-workers 4 $NET 2>&1 | tee "$OUT/bench_train.txt"

# 4. a checkpoint to time inference with, then inference speed: plain sliding_window_inference against infer.py's
$PY train.py --data "$DATA/prep" --output "$OUT/train" --epochs "$TRAIN_EPOCHS" --device "$DEVICE" \
    --val-every 10 $NET > "$OUT/train.txt" 2>&1
tail -3 "$OUT/train.txt"
$PY benchmarks/bench_infer.py --prep "$DATA/prep" --checkpoint "$OUT/train/best.pt" --device "$DEVICE" \
    --repeats "$REPEATS" --json "$OUT/bench_infer.json" 2>&1 | tee "$OUT/bench_infer.txt"
rm -f "$OUT/train/last.pt"  # the best checkpoint is enough to bring back
if [ "$tests_status" != 0 ]; then
    echo "tests failed (exit $tests_status): see $OUT/pytest.txt" >&2
    exit "$tests_status"
fi
