#!/usr/bin/env bash
# Runs of the `paper` profile on a lent GPU, in parts that each fit one 10-minute command (issue 3).
#   TABLES="table2 table3" SEEDS=0 WORKERS=3 T_TRAIN=470 bash tools/gpu_paper.sh OUT_DIR
# Runs already under results/paper/runs/ (carried back from an earlier part) come from the cache, so
# each part continues the last. WORKERS processes train side by side on the one GPU (osteo grid
# --worker I/N); a run a worker cannot finish within T_TRAIN seconds is lost, the finished ones stay.
# Brings back OUT_DIR/paper-results.tgz: results/paper/ without checkpoints and executed notebooks.
set -u
OUT=${1:?output folder}
TABLES=${TABLES:-table2 table3}
SEEDS=${SEEDS:-0}
WORKERS=${WORKERS:-3}
T_TRAIN=${T_TRAIN:-470}
. tools/device_env.sh
if [ "${CUDA_TESTS:-1}" = 1 ]; then  # the eager CUDA tests, on the GPU while the CPU makes the data
  timeout 150 python3 -m pytest -o addopts= -p no:cacheprovider -v -rfE --durations=0 tests/test_cuda.py \
    -k "trains_on_cuda or same_function or (not compile and not graphs)" > "$OUT/test_cuda_fast.log" 2>&1 &
fi
# the synthetic paper set: deterministic, so the same files and run keys on every machine
time python3 -c "from osteo import Experiments; print(Experiments('paper', progress=False).manifest())"
wait
for i in $(seq 1 "$WORKERS"); do
  timeout "$T_TRAIN" python3 -m osteo.cli grid --profile paper --tables $TABLES --seeds $SEEDS \
    --worker "$i/$WORKERS" --no-progress > "$OUT/worker$i.log" 2>&1 &
done
wait
python3 -m osteo.cli grid --profile paper --tables $TABLES --seeds $SEEDS --only-cached --no-progress 2>&1 | tee "$OUT/grid.log"
tail -n 3 "$OUT"/worker*.log
tar czf "$OUT/paper-results.tgz" --exclude=checkpoint.pt --exclude=notebooks results/paper
