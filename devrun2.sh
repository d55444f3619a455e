#!/usr/bin/env bash
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/card.txt
timeout 150 python3 -m pytest -m gpu tests/gpu/test_lifecycle_cuda.py -p no:cacheprovider -rfE -W ignore -k "copied_in_place or swaps_under_load" > $OUT/gpu_tests.log 2>&1; echo "gpu tests rc=$?"; tail -2 $OUT/gpu_tests.log
run() { # name args...
  local name=$1; shift
  timeout 120 python3 tools/bench_swap.py --steady-s 5 --compile off --between-s 0.3 --json $OUT/swap_$name.json "$@" > $OUT/swap_$name.txt 2>&1; echo "== $name rc=$?"
  grep -E "idle gap|refused|p99 during|p50 during|one swap|in place|loop lag" $OUT/swap_$name.txt
}
run inplace1 --swaps 20 --weights-in-place on
run rebuild1 --swaps 4 --weights-in-place off
run inplace_share003 --swaps 8 --weights-in-place on --loader-share 0.03
run inplace2 --swaps 20 --weights-in-place on
run rebuild2 --swaps 4 --weights-in-place off
