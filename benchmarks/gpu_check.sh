#!/usr/bin/env bash
# The one GPU check: the GPU test suite (Triton kernels compiled for the real device, no
# interpreter) and the speed table, in about 5 minutes on an H100. Logs go to $OUT (or
# ./gpu-logs). Each step runs under `timeout` so a hang cannot eat the machine's time.
#
#   bash benchmarks/gpu_check.sh
#
# Needs python3 with torch (CUDA) and triton; the NumPy reference tier also needs clifford.
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

tests=(tests/test_triton_tier.py)
for extra in tests/test_tier_agreement.py tests/test_torch_tier.py; do
  [ -f "$extra" ] && tests+=("$extra")
done
# Each distinct kernel variant compiles once (seconds each): spread the suite over 8 processes.
par=()
"$PY" -c "import xdist" 2>/dev/null && par=(-n 8)
echo "== GPU tests: ${tests[*]} ${par[*]}" | tee "$LOGS/gpu_tests.log"
timeout -k 10 240 "$PY" -m pytest -q -p no:cacheprovider "${par[@]}" "${tests[@]}" 2>&1 | tee -a "$LOGS/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== speed table" | tee "$LOGS/gpu_speed.log"
timeout -k 10 150 "$PY" benchmarks/gpu_speed.py 2>&1 | tee -a "$LOGS/gpu_speed.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "gpu_check exit status: $status" | tee -a "$LOGS/gpu_speed.log"
exit $status
