#!/usr/bin/env bash
# Every GPU measurement of issue #36 in one go, for the few minutes a GPU is lent:
#   bash bench/gpu_checks.sh                      # this checkout
#   BASELINE=/path/to/older/checkout bash bench/gpu_checks.sh   # and A/B against it, on the same machine start
# Each benchmark prints ratios against the plain forward or sampler (bench/overhead.py, bench/ovdiff_overhead.py);
# --kernels adds the CUDA kernels each row launches beyond a plain forward. Results go to stdout and $OUT if set.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}/gpu_checks.txt"
run() {  # run <checkout> <label>
    local root="$1" label="$2"
    echo "== $label: $(cd "$root" && git log -1 --format=%h 2>/dev/null || echo "$root")" | tee -a "$out"
    (cd "$root" && python bench/overhead.py --device cuda --dtype float16 --repeats 20 --kernels) 2>&1 | tee -a "$out"
    (cd "$root" && python bench/ovdiff_overhead.py --device cuda --dtype float16 --images 8 --steps 30) 2>&1 | tee -a "$out"
}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out"
python -m pytest -q tests/test_cuda.py 2>&1 | tail -3 | tee -a "$out"
# The ComfyUI nodes with ComfyUI's own GPU choice: outputs back on the CPU, models unchanged
TEXTMASK_COMFY_GPU=1 python -m pytest -q tests/test_comfy.py 2>&1 | tail -3 | tee -a "$out"
run . current
if [ -n "${BASELINE:-}" ]; then
    run "$BASELINE" baseline
    run . "current, again"  # the machine's drift shows between the two current runs
fi
