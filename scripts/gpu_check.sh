#!/usr/bin/env bash
# The GPU check: one run on a machine with a GPU builds the CUDA extension, runs the whole test suite on the GPU
# (Triton compiled for real, the CUDA C++ kernels, bf16), the Triton compile check, and the GPU benchmarks, and
# leaves a log, the test report and the benchmark JSON in $OUT. It takes about 8 minutes.
#
# A machine with a GPU may have no internet access, so the build tools travel as wheels:
#   on a machine with internet, once:
#                pip download --only-binary=:all: --python-version 3.12 -d .wheels pybind11 ninja setuptools \
#                    liger-kernel hjson msgpack py-cpuinfo einops
#                DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation -w .wheels deepspeed
#   on the machine with a GPU, in a copy of the repository that includes .wheels/:
#                bash scripts/gpu_check.sh
# Liger-Kernel and DeepSpeed are the benchmarks' contenders (optional: their benchmarks skip without them).
# Then put the JSON under benchmarks/results/ in place of the older one of its machine kind (benchmarks/README.md,
# "Results files") and run python benchmarks/report.py.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
step() { echo "=== $1 ($(date +%T), ${SECONDS}s)"; }

step machine
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.cuda.get_device_name())"

step build
if [ -d .wheels ]; then
  pip install --quiet --no-index --find-links .wheels pybind11 ninja setuptools
  pip install --quiet --no-index --find-links .wheels --no-deps liger-kernel deepspeed hjson msgpack py-cpuinfo \
    einops || echo "benchmark contenders not installed"
fi
MAX_JOBS=$(nproc) pip install --no-build-isolation --no-deps -e . 2>&1 | tail -3
python -c "import aquila._C, aquila._cuda; print('extensions import')" || echo "BUILD FAILED"

step tests
# The GPU-marked tests only: the CPU ones run in CI. Triton compiles each kernel configuration on first use.
timeout -s INT 200 python -m pytest tests -m gpu -q -p no:cacheprovider --junitxml "$OUT/tests.xml" 2>&1 | tail -40

step benchmarks
# SIGINT at the limit: pytest still writes the results it has (marked "interrupted" in the JSON).
timeout -s INT 220 python -m pytest benchmarks --benchmark-only -q -p no:cacheprovider 2>&1 | grep -v "^test_\|^---\|^Name\|^$" | tail -80
cp benchmarks/results/kernels-cuda-*.json "$OUT/" 2>/dev/null || echo "no benchmark JSON written"

step done
