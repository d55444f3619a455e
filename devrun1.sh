#!/usr/bin/env bash
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/card.txt
git log --oneline -1 > $OUT/commit.txt 2>/dev/null
timeout 330 python3 -m pytest -m gpu tests/gpu -p no:cacheprovider -rfE -W ignore -x -k "copied_in_place or test_cuda_backend or test_shares or test_lifecycle_cuda or test_cuda_host" > $OUT/gpu_tests.log 2>&1; echo "gpu tests rc=$?"
tail -5 $OUT/gpu_tests.log
for mode in on off; do
  timeout 110 python3 tools/bench_swap.py --swaps $([ $mode = on ] && echo 20 || echo 4) --steady-s 4 --compile off --weights-in-place $mode --between-s 0.3 --json $OUT/swap_$mode.json > $OUT/swap_$mode.txt 2>&1; echo "bench $mode rc=$?"
  grep -E "idle gap|refused|p99 during|p50 during|memory|one swap|in place|loop lag" $OUT/swap_$mode.txt
done
