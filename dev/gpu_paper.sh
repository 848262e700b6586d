#!/usr/bin/env bash
# Runs of the `paper` profile on a GPU machine reached by 10-minute commands, in parts that each fit one.
#   TABLES="table2 table3" SEEDS=0 WORKERS=3 T_TRAIN=470 [BATCH_RUNS=4] bash dev/gpu_paper.sh OUT_DIR
# The result.json files under results/paper/runs/ are tracked by git, so they travel with every call
# and their runs come from the cache: each part continues the last. Do NOT carry results/paper/runs:
# a carried path replaces the device's copy, and with it the checkpoints of unfinished runs.
# BATCH_RUNS=N trains up to N runs of one network at once as one batched network (osteo grid --batch-runs N).
# WORKERS processes train side by side on the one GPU (osteo grid --worker I/N); a run a worker cannot
# finish within T_TRAIN seconds keeps its last checkpoint (every 30 s) on the device, and the next
# call resumes it while the machine is still warm (it goes back after 30 s idle); a fresh machine
# starts that run again.
# REPRODUCE=1 then executes the notebooks under `paper` with the same seeds (within T_NB seconds;
# NB_TABLES="table2 table3 fig3 fig4" picks notebooks as `osteo reproduce --tables` does). Notebooks
# 02 and 08 train Ours and ResNet18+ACM again for their weights (git keeps no checkpoints).
# Brings back OUT_DIR/paper-results.tgz: results/paper/ without checkpoints (executed notebooks and
# figures included when REPRODUCE=1).
set -u
OUT=${1:?output folder}
TABLES=${TABLES:-table2 table3}
SEEDS=${SEEDS:-0}
WORKERS=${WORKERS:-3}
T_TRAIN=${T_TRAIN:-470}
. dev/device_env.sh
if [ "${CUDA_TESTS:-1}" = 1 ]; then  # the eager CUDA tests, on the GPU while the CPU makes the data
  timeout 150 python3 -m pytest -o addopts= -p no:cacheprovider -v -rfE --durations=0 tests/test_cuda.py \
    -k "trains_on_cuda or same_function or (not compile and not graphs)" > "$OUT/test_cuda_fast.log" 2>&1 &
fi
# the synthetic paper set (deterministic, so the same files and run keys on every machine), and its
# resized-slice caches for every input size the tables need, before the workers start
time python3 - $TABLES <<'PY'
import sys
from osteo import Experiments
e = Experiments("paper", progress=False)
print(e.manifest())
for size in sorted({c.image_size for c in e.table_configs(sys.argv[1:])}):
    e.data(size)
    print(f"slices cached at {size} px")
PY
wait
for i in $(seq 1 "$WORKERS"); do
  timeout "$T_TRAIN" python3 -m osteo.cli grid --profile paper --tables $TABLES --seeds $SEEDS \
    --worker "$i/$WORKERS" ${BATCH_RUNS:+--batch-runs $BATCH_RUNS} --no-progress > "$OUT/worker$i.log" 2>&1 &
done
wait
python3 -m osteo.cli grid --profile paper --tables $TABLES --seeds $SEEDS --only-cached --no-progress 2>&1 | tee "$OUT/grid.log"
tail -n 3 "$OUT"/worker*.log
if [ "${REPRODUCE:-0}" = 1 ]; then
  timeout "${T_NB:-400}" python3 -m osteo.cli reproduce --profile paper --seeds $SEEDS ${NB_TABLES:+--tables $NB_TABLES} \
    > "$OUT/reproduce.log" 2>&1
  echo "reproduce exit $?"; tail -n 5 "$OUT/reproduce.log"
  tar czf "$OUT/paper-results.tgz" --exclude=checkpoint.pt --exclude='*.tmp' results/paper
else
  tar czf "$OUT/paper-results.tgz" --exclude=checkpoint.pt --exclude='*.tmp' --exclude=notebooks results/paper
fi
