#!/usr/bin/env bash
# The CUDA checks, as run on an H100 (see results/bench/README.md).
# Usage on the GPU machine, from the repository root, with the wheels of dev/device_wheels.sh in .whl/ (where pydicom is not installed):
#   bash dev/gpu_checks.sh OUT_DIR
# Writes OUT_DIR/test_cuda.log, OUT_DIR/bench.log and the benchmark's JSON table.
# STEPS picks the steps below (default "1 2 3"); all of them need more than one 10-minute call since the
# bench gained its N-twins rows: e.g. STEPS="1 2" T_BENCH=450, then STEPS="3 4" T_SLOW=300.
set -u
OUT=${1:?output folder}
. dev/device_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision, osteo; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/gpu.txt"
PYTEST="python3 -m pytest -o addopts= -p no:cacheprovider -v -rfE --durations=0 tests/test_cuda.py"
# 1. eager CUDA checks (short bf16 training beats chance; CPU and GPU compute the same function)
has() { case " ${STEPS:-1 2 3} " in *" $1 "*) return 0;; esac; return 1; }
has 1 && timeout ${T_FAST:-120} $PYTEST -k "trains_on_cuda or same_function or (matches_float32_eager and not compile and not graphs)" 2>&1 | tee "$OUT/test_cuda_fast.log"
# 2. the throughput table at the paper's size
has 2 && timeout ${T_BENCH:-330} python3 -m osteo.cli bench --image-size 224 --batch-size 128 --steps 20 --warmup 5 \
  --engines ${ENGINES:-eager grouped+compile compile grouped grouped+graphs} --out-dir "$OUT" 2>&1 | tee "$OUT/bench.log"
# 3. the compiled / CUDA-graph engines' equivalence and no-sync checks
has 3 && timeout ${T_SLOW:-130} $PYTEST -k "not trains_on_cuda and not same_function and not (matches_float32_eager and not compile and not graphs)" 2>&1 | tee "$OUT/test_cuda.log"
# 4. the compile cache: the first compiled step cold, with the artifacts file only, with the whole folder
has 4 && timeout ${T_CACHE:-400} python3 benchmarks/compile_cache.py --device cuda --image-size 224 --batch-size 128 \
  --out "$OUT/compile-cache-224px.json" 2>&1 | tee "$OUT/compile_cache.log"
