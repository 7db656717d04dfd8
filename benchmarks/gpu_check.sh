#!/usr/bin/env bash
# The one GPU check, about 7-8 minutes: the tests of the PRMT asm path (interleaved packing: float16
# lookups by inline prmt.b32, which only a GPU runs) under `timeout 90`, the speed table with a sweep of
# launch configurations under `timeout 150` (early, so a short lease still measures it), then the GPU
# cases of the test suites (Triton kernels compiled for the real device, no interpreter; torch on CUDA;
# the CUDA-graph capture of unchecked calls) under `timeout 240`. Logs go to $OUT (or ./gpu-logs).
#
#   bash benchmarks/gpu_check.sh
#
# Needs python3 with torch (CUDA) and triton; the NumPy reference tier also needs clifford.
# pytest prints one line per failure (-rf, --tb=line), so the output's tail names what failed.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS="${OUT:-$PWD/gpu-logs}"
mkdir -p "$LOGS"
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY="${PYTHON:-python3}"
status=0

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  "$PY" -c "import sys, torch, triton, numpy; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('triton', triton.__version__, 'numpy', numpy.__version__)"
  "$PY" -c "import clifford; print('clifford', clifford.__version__)" || echo "MISSING clifford: the NumPy reference tier (and tests comparing to it) cannot import"
} 2>&1 | tee "$LOGS/env.log"

# The asm against the NumPy reference (float16 centroids, bit for bit) and against its integer emulation,
# and attention over interleaved caches against contiguous ones, bit for bit.
echo "== PRMT asm path" | tee "$LOGS/prmt.log"
timeout -k 10 90 "$PY" -m pytest -q -p no:cacheprovider -rfEs --tb=short tests/test_triton_tier.py -k "interleaved" 2>&1 \
  | tee -a "$LOGS/prmt.log" | tail -15
rc=${PIPESTATUS[0]}
[ "$rc" -eq 124 ] && echo "PRMT asm tests TIMED OUT after 90 s"
[ "$rc" -eq 0 ] || status=1

echo "== speed table" | tee "$LOGS/gpu_speed.log"
timeout -k 10 150 "$PY" benchmarks/gpu_speed.py --sweep 2>&1 | tee -a "$LOGS/gpu_speed.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 124 ] && echo "speed table TIMED OUT after 150 s"
[ "$rc" -eq 0 ] || status=1

tests=(tests/test_triton_tier.py tests/test_unchecked_calls.py tests/test_quantize_into.py tests/test_paged_attention.py)
for extra in tests/test_tier_agreement.py tests/test_torch_tier.py; do
  [ -f "$extra" ] && tests+=("$extra")
done
# Each distinct kernel variant compiles once (seconds each): spread the cases over 8 processes when
# pytest-xdist works here; otherwise keep it from loading at all.
par=(-p no:xdist)
"$PY" -m pytest -q -p no:cacheprovider -n 2 --collect-only tests/test_triton_tier.py >/dev/null 2>&1 && par=(-n 8)
echo "== GPU tests (cuda/triton cases): ${tests[*]} ${par[*]}" | tee "$LOGS/gpu_tests.log"
# -v names each test as it finishes (so a failure is known even if the timeout cuts the run short);
# the console shows only failures, errors, their one-line reasons and the summary.
timeout -k 10 240 "$PY" -m pytest -v -p no:cacheprovider -rfE --tb=line -k "cuda or triton" "${par[@]}" "${tests[@]}" 2>&1 \
  | tee -a "$LOGS/gpu_tests.log" | grep -E "FAILED|ERROR|Error|passed|failed|^/.*:[0-9]+: " | tail -40
rc=${PIPESTATUS[0]}
[ "$rc" -eq 124 ] && echo "GPU tests TIMED OUT after 240 s"
[ "$rc" -eq 0 ] || status=1
echo "== GPU tests exit status: $rc; tests finished: $(grep -cE ' (PASSED|FAILED|ERROR|SKIPPED)' "$LOGS/gpu_tests.log")"

echo "gpu_check exit status: $status" | tee -a "$LOGS/gpu_speed.log"
exit $status
