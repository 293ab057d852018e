"""Benchmark harness: every implementation of an op runs in the same process, on the same inputs, and the summary
reports each one's time as a ratio to torch eager and its effective bandwidth as a fraction of the machine's measured
copy bandwidth. Results are written as JSON under benchmarks/results/.

On CPU, outputs of 100+ MB come from fresh mmap'ed pages by default, and touching them (~4 GB/s here) would swamp
every large op's time. Like the caching allocators on GPUs, glibc is told to keep and reuse freed memory, for every
contender alike; the copy bandwidth is measured under the same setting.
"""

import ctypes
import datetime
import gc
import json
import os
import platform
import sys
import time

import pytest
import torch

from aquila.files import AtomicFile

if not torch.cuda.is_available():
    # On a 2-core CPU, torch.compile's compile workers would keep running beside the first timings. (Read when
    # torch.compile first runs, so setting it after importing torch is in time.)
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

RESULTS = []
SESSION = {}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _keep_freed_memory():
    if LIBC:
        LIBC.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve allocations up to 1 GiB from the heap
        LIBC.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never hand freed heap memory back


def _return_freed_memory():
    if LIBC:
        LIBC.mallopt(-3, 128 * 1024)  # glibc's defaults: large blocks mmap'ed, and unmapped when freed
        LIBC.mallopt(-1, 128 * 1024)
        LIBC.malloc_trim(0)


_keep_freed_memory()


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="small sizes: checks that the benchmarks run (CI)")


@pytest.fixture(scope="session")
def quick(request):
    return request.config.getoption("--quick")


@pytest.fixture(scope="session")
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timings(fn, device, repeats):
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)


def median_seconds(fn, device, repeats=15):
    return timings(fn, device, repeats)[repeats // 2]


def best_seconds(fn, device, repeats=7):
    """For the machine's ceilings: the best of a few runs, what the machine can do when nothing is in the way."""
    return timings(fn, device, repeats)[0]


@pytest.fixture(scope="session")
def matmul_rate(device):
    """FLOP/s of a large matmul in the benchmarks' dtype (bf16 on GPU, fp32 on CPU), best of 7: the compute
    ceiling."""
    n = 8192 if device == "cuda" else 4096
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / best_seconds(lambda: a @ b, device)


@pytest.fixture(scope="session")
def copy_bandwidth(device):
    """Bytes read + written per second by a device-to-device copy of 256 MiB, best of 15: the ceiling for
    memory-bound ops."""
    src = torch.randn(64 * 2**20, device=device)
    dst = torch.empty_like(src)
    seconds = best_seconds(lambda: dst.copy_(src), device, repeats=15)
    return 2 * src.numel() * src.element_size() / seconds


def _proc_status_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def extra_peak_bytes(fn, device):
    """Memory fn needs beyond what exists before it: peak allocated on GPU; on CPU the peak resident set (reset
    through /proc/self/clear_refs) with glibc returning freed memory at once, so the resident set is what is live."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    _return_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident set restarts from the current one
        before = _proc_status_bytes("VmRSS")
        fn()
        return _proc_status_bytes("VmHWM") - before
    finally:
        _keep_freed_memory()


@pytest.fixture
def measure(benchmark, device):
    """measure(op, impl, fn, bytes_moved=None, flops=None, memory=False, rounds=15): times fn with pytest-benchmark,
    optionally measures its extra peak memory, and records both for the summary (the record is returned, for a
    test to add to)."""

    def run(op, impl, fn, bytes_moved=None, flops=None, memory=False, rounds=15):
        benchmark.group = op

        def timed():
            fn()
            synchronize(device)

        benchmark.pedantic(timed, warmup_rounds=min(3, rounds), rounds=rounds, iterations=1)
        if benchmark.disabled:  # --benchmark-disable: a smoke run, timed once for the summary only
            median = median_seconds(timed, device, repeats=1)
        else:
            median = benchmark.stats.stats.median
        record = {"op": op, "impl": impl, "seconds": median, "bytes": bytes_moved, "flops": flops, "device": device}
        if memory and (device == "cuda" or os.path.exists("/proc/self/clear_refs")):
            record["peak_extra_bytes"] = extra_peak_bytes(timed, device)
        benchmark.extra_info.update({k: v for k, v in record.items() if k not in ("op", "device")})
        RESULTS.append(record)
        return record

    return run


@pytest.fixture
def record(device):
    """record(op, impl, seconds, flops=None, **extra): adds a result measured elsewhere (in other processes) to the
    summary and the JSON."""

    def add(op, impl, seconds, flops=None, **extra):
        result = {"op": op, "impl": impl, "seconds": seconds, "bytes": None, "flops": flops, "device": device,
                  **extra}
        RESULTS.append(result)
        return result

    return add


def machine_description(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def _format(value, pattern, scale=1.0):
    return "-" if value is None else pattern.format(value * scale)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS:
        return
    device = RESULTS[0]["device"]
    bandwidth = SESSION.get("copy_bandwidth")
    # The baseline of each op: torch eager, torch's SDPA for attention, transformers' generate for decoding.
    baselines = {r["op"]: r["seconds"] for r in RESULTS
                 if r["impl"] in ("torch eager", "torch sdpa", "transformers generate", "transformers",
                                  "transformers + deepspeed zero-2")}
    lines = [f"machine: {machine_description(device)}; torch {torch.__version__}"]
    if bandwidth:
        lines.append(f"measured copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write); matmul "
                     f"{SESSION['matmul_rate'] / 1e9:.0f} GFLOP/s")
    lines.append(f"{'op':<48} {'impl':<16} {'ms':>9} {'GB/s':>7} {'of copy':>7} {'GFLOP/s':>8} {'vs base':>8} "
                 f"{'peak MB':>8}")
    for r in RESULTS:
        r["gb_per_s"] = r["bytes"] / r["seconds"] / 1e9 if r["bytes"] else None
        r["fraction_of_copy"] = r["bytes"] / r["seconds"] / bandwidth if bandwidth and r["bytes"] else None
        r["gflop_per_s"] = r["flops"] / r["seconds"] / 1e9 if r["flops"] else None
        if r["flops"] and SESSION.get("matmul_rate"):
            r["fraction_of_matmul"] = r["flops"] / r["seconds"] / SESSION["matmul_rate"]
        r["speedup_vs_baseline"] = baselines[r["op"]] / r["seconds"] if r["op"] in baselines else None
        cells = [_format(r["gb_per_s"], "{:.1f}"), _format(r["fraction_of_copy"], "{:.0%}"),
                 _format(r["gflop_per_s"], "{:.0f}"), _format(r["speedup_vs_baseline"], "{:.2f}x"),
                 _format(r.get("peak_extra_bytes", r.get("peak_memory_bytes")), "{:.0f}", 1e-6)]
        lines.append(f"{r['op']:<48} {r['impl']:<16} {r['seconds'] * 1e3:>9.3f} {cells[0]:>7} {cells[1]:>7} "
                     f"{cells[2]:>8} {cells[3]:>8} {cells[4]:>8}")
    terminalreporter.write_sep("=", "aquila benchmark summary")
    for line in lines:
        terminalreporter.write_line(line)
    if config.getoption("--quick") or config.getoption("benchmark_disable", False):
        return
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_description(device), "device": device, "torch": torch.__version__,
              "python": platform.python_version(), "copy_bandwidth_bytes_per_s": bandwidth,
              "matmul_flop_per_s": SESSION.get("matmul_rate"),
              "interrupted": exitstatus == pytest.ExitCode.INTERRUPTED,  # e.g. the GPU check's time limit
              "results": RESULTS}
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        pass
    folder = os.path.join(REPO, "benchmarks", "results")
    os.makedirs(folder, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    path = os.path.join(folder, f"kernels-{device}-{stamp}.json")  # one file per run: a partial run replaces nothing
    with AtomicFile(path, "w") as out:
        json.dump(report, out, indent=1)
    terminalreporter.write_line(f"written: {os.path.relpath(path, REPO)}")


@pytest.fixture(scope="session", autouse=True)
def _record_ceilings(copy_bandwidth, matmul_rate):
    SESSION["copy_bandwidth"] = copy_bandwidth
    SESSION["matmul_rate"] = matmul_rate
