#!/usr/bin/env bash
# The GPU check (issue 25): run on a machine with a CUDA device, from the repository root, with the project
# installed (.venv). Writes what it measured under ${OUT:-gpu-check}/: the device, the GPU tests' report and the
# CUDA bench rows; about ten minutes on one GPU. CPU-only machines deselect every GPU test (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
py=.venv/bin/python
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # deterministic cuBLAS: a resume on the same GPU is bit-identical
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.csv"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count())" \
  | tee "$out/torch.txt"
# the GPU tests, one at a time (a GPU run does not share the device with a second worker)
tests=0
timeout 420 "$py" -m pytest -m gpu -n 0 -q -p no:cacheprovider --junitxml "$out/gpu-tests.xml" \
  > "$out/gpu-tests.txt" 2>&1 || tests=$?
tail -5 "$out/gpu-tests.txt"
# the CUDA bench rows: P-1 (the step on the device, against the same plain loop there) and the rest as run
bench=0
timeout 240 .venv/bin/esper bench --set run.device=cuda --json > "$out/bench-cuda.json" || bench=$?
echo "gpu tests exit $tests, bench exit $bench: $out"
exit $(( tests || bench ))
