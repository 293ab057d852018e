#!/usr/bin/env bash
# The GPU check: one run on a machine with a GPU (one H100 80 GB or H200; Python 3.12, torch with CUDA, triton 3.6+,
# nvcc, pytest, pytest-benchmark; no internet access; about 15 minutes of machine time in all, so this script is
# budgeted at under 10). It installs the shipped wheels, builds the extensions, compiles and checks every Triton kernel
# as launched for the card (which also fills Triton's cache for the tests), runs a GPU test subset, CUDA's
# compute-sanitizer (memcheck, racecheck) over a small CUDA test subset, and a benchmark subset. Everything it produces
# goes straight into $OUT: the whole log, the build log, the compile check's table, the test reports, every JSON.
#
#   bash scripts/gpu_check.sh --dry-run        the plan: stages, time budgets, wheels and their total size (no GPU needed)
#   bash scripts/gpu_check.sh --requirements   the shipped wheels as requirements, one a line
#   bash scripts/gpu_check.sh                  the run, from a copy of the repository with the wheels in .wheels/
#
# The wheels (scripts/gpu_wheels.txt says how to download them, each with --no-deps) must stay within 50 MiB.
# Then put the benchmark JSON under benchmarks/results/ in place of the older one of its machine kind
# (benchmarks/README.md, "Results files") and run python benchmarks/report.py.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEEL_LIST=scripts/gpu_wheels.txt
WHEEL_LIMIT=$((50 * 1024 * 1024))

# Stage budgets in seconds (each stage runs under `timeout`). Tests and benchmarks (compile check to benchmarks): 360.
BUDGET_VERSIONS=15
BUDGET_WHEELS=40
BUDGET_BUILD=150
BUDGET_COMPILE=110
BUDGET_TESTS=110
BUDGET_SANITIZER=60  # memcheck and racecheck, 30 each
BUDGET_BENCHMARKS=80
TOTAL=$((BUDGET_VERSIONS + BUDGET_WHEELS + BUDGET_BUILD + BUDGET_COMPILE + BUDGET_TESTS + BUDGET_SANITIZER
         + BUDGET_BENCHMARKS))

# The subsets. Tests: every GPU-marked kernel test (Triton compiled for real, the CUDA C++ kernels, bf16) and the
# model's GPU tests. Sanitizer: the CUDA C++ backend's fp32 RMSNorm and attention tests. Benchmarks: the kernels.
GPU_TESTS="tests/kernels tests/model"
SANITIZER_TESTS="tests/kernels/test_rms_norm.py tests/kernels/test_attention.py"
SANITIZER_SELECTION="cuda-cuda and float32"
BENCHMARK_FILES="benchmarks/test_norm_rotary.py benchmarks/test_attention.py benchmarks/test_cross_entropy.py"

requirements() { grep -v '^\s*#' "$WHEEL_LIST" | awk 'NF {print $1}'; }
wheel_files() { grep -v '^\s*#' "$WHEEL_LIST" | awk 'NF {print $3}'; }
listed_size() { grep -v '^\s*#' "$WHEEL_LIST" | awk 'NF {s += $2} END {print s}'; }

plan() {
  echo "GPU check plan (budget ${TOTAL} s = $((TOTAL / 60)) min $((TOTAL % 60)) s; output in \$OUT)"
  printf '  %-11s %4s s  %s\n' \
    versions "$BUDGET_VERSIONS" "nvidia-smi, nvcc --version, driver, python3/pip in use, torch, triton, setuptools" \
    wheels "$BUDGET_WHEELS" "python3 -m pip install --no-index --no-deps, one wheel at a time from .wheels/" \
    build "$BUDGET_BUILD" "python3 -m pip install --no-build-isolation --no-deps -e . (whole log: \$OUT/build.log)" \
    compile "$BUDGET_COMPILE" "tests/kernels/triton_compile_check.py --all --targets <card> over all cores: checks and fills Triton's cache" \
    tests "$BUDGET_TESTS" "pytest -m gpu $GPU_TESTS (junit XML)" \
    sanitizer "$BUDGET_SANITIZER" "compute-sanitizer --tool memcheck, then racecheck: $SANITIZER_TESTS -k '$SANITIZER_SELECTION'" \
    benchmarks "$BUDGET_BENCHMARKS" "pytest --benchmark-only, one session per file, JSON into \$OUT: $BENCHMARK_FILES"
  echo "  tests and benchmarks (compile to benchmarks): $((BUDGET_COMPILE + BUDGET_TESTS + BUDGET_SANITIZER + BUDGET_BENCHMARKS)) s"
  echo "Wheels ($WHEEL_LIST, each installed with --no-deps):"
  grep -v '^\s*#' "$WHEEL_LIST" | awk 'NF {printf "  %-26s %9d bytes  %s\n", $1, $2, $3}'
  local size present=0 missing=0 actual=0 f
  size=$(listed_size)
  for f in $(wheel_files); do
    if [ -f ".wheels/$f" ]; then present=$((present + 1)); actual=$((actual + $(stat -c %s ".wheels/$f")))
    else missing=$((missing + 1)); fi
  done
  awk -v s="$size" 'BEGIN {printf "  total listed: %d bytes = %.1f MiB (limit 50 MiB)\n", s, s / 1048576}'
  echo "  in .wheels/: $present present ($actual bytes), $missing missing"
  if [ "$size" -gt "$WHEEL_LIMIT" ] || [ "$actual" -gt "$WHEEL_LIMIT" ]; then
    echo "  OVER THE 50 MiB LIMIT"; return 1
  fi
}

case "${1:-}" in
  --dry-run) plan; exit $? ;;
  --requirements) requirements; exit 0 ;;
  "") ;;
  *) echo "usage: bash scripts/gpu_check.sh [--dry-run | --requirements]"; exit 2 ;;
esac

OUT=${OUT:-benchmarks/results/gpu-check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
step() { echo "=== $1 (budget $2 s; $(date +%T), ${SECONDS} s in)"; }
plan

step versions "$BUDGET_VERSIONS"
echo "python3: $(command -v python3) ($(python3 --version 2>&1)); pip: $(python3 -m pip --version)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,compute_cap --format=csv
nvcc --version | tail -2 || /usr/local/cuda/bin/nvcc --version | tail -2
timeout "$BUDGET_VERSIONS" python3 -c "import sys, torch, triton, setuptools; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'setuptools', \
setuptools.__version__, torch.cuda.get_device_name())"
command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer

step wheels "$BUDGET_WHEELS"
# One at a time, without dependencies: a missing or broken wheel costs only itself (and what needs it).
if [ -d .wheels ]; then
  for f in $(wheel_files); do
    if [ -f ".wheels/$f" ]; then
      timeout 30 python3 -m pip install --quiet --no-index --no-deps ".wheels/$f" || echo "WHEEL FAILED: $f"
    else
      echo "WHEEL MISSING: $f"
    fi
  done
else
  echo "no .wheels/ directory: the build uses what the machine has; the benchmark contenders will skip"
fi
python3 -m pip list 2>/dev/null | grep -i -E "^(pybind11|ninja|setuptools|liger|deepspeed|pydantic) " || true

step build "$BUDGET_BUILD"
MAX_JOBS=$(nproc) timeout "$BUDGET_BUILD" python3 -m pip install -v --no-build-isolation --no-deps -e . \
  > "$OUT/build.log" 2>&1
echo "build exit status $? (whole log in $OUT/build.log); its last lines:"
tail -5 "$OUT/build.log"
python3 -c "import aquila, aquila._C, aquila._cuda; print('extensions import from', aquila.__file__)" \
  || echo "BUILD FAILED"

step compile "$BUDGET_COMPILE"
# Every launch case (--all) for this card, in parallel over all cores, as launched: this fills Triton's cache, so the
# tests below do not compile, and checks shared memory and spills under this machine's Triton.
timeout -s INT "$BUDGET_COMPILE" python3 tests/kernels/triton_compile_check.py --all --workers "$(nproc)" \
  --targets "$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)" \
  > "$OUT/compile_check.log" 2>&1
echo "compile check exit status $?"; grep -v " ok$" "$OUT/compile_check.log" | tail -20

step tests "$BUDGET_TESTS"
# SIGINT at the limit: pytest still writes the report of what ran.
timeout -s INT "$BUDGET_TESTS" python3 -m pytest $GPU_TESTS -m gpu -q -p no:cacheprovider \
  --junitxml "$OUT/tests.xml" 2>&1 | tail -40

step sanitizer "$BUDGET_SANITIZER"
for tool in memcheck racecheck; do
  timeout -s INT $((BUDGET_SANITIZER / 2)) compute-sanitizer --tool "$tool" --error-exitcode 3 \
    python3 -m pytest $SANITIZER_TESTS -m gpu -k "$SANITIZER_SELECTION" -q -p no:cacheprovider -x \
    --junitxml "$OUT/sanitizer-$tool.xml" > "$OUT/sanitizer-$tool.log" 2>&1
  echo "compute-sanitizer --tool $tool: exit status $? (3: errors found; 124: out of time)"
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/sanitizer-$tool.log" | tail -3
done

step benchmarks "$BUDGET_BENCHMARKS"
# One pytest session per file, each writing its JSON into $OUT as it ends: a run cut short keeps what finished.
deadline=$((SECONDS + BUDGET_BENCHMARKS))
for file in $BENCHMARK_FILES; do
  left=$((deadline - SECONDS))
  [ "$left" -gt 5 ] || { echo "no time left for $file"; continue; }
  name=$(basename "$file" .py)
  timeout -s INT "$left" python3 -m pytest "$file" --benchmark-only -q -p no:cacheprovider \
    --benchmark-json "$OUT/benchmark-$name.json" 2>&1 | grep -v "^test_\|^---\|^Name\|^$" | tail -20
  for json in benchmarks/results/kernels-cuda-*.json; do
    [ -f "$json" ] && mv "$json" "$OUT/$name-$(basename "$json")"
  done
done
ls -la "$OUT"

step done 0
