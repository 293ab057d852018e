"""Benchmark harness: every implementation of an op runs in the same process, on the same inputs, and the summary
reports each one's time as a ratio to torch eager and its effective bandwidth as a fraction of the machine's measured
copy bandwidth. Results are written as JSON under benchmarks/results/.

On CPU, outputs of 100+ MB come from fresh mmap'ed pages by default, and touching them (~4 GB/s here) would swamp
every large op's time. Like the caching allocators on GPUs, glibc is told to keep and reuse freed memory, for every
contender alike; the copy bandwidth is measured under the same setting.
"""

import ctypes
import datetime
import json
import os
import platform
import sys
import time

# torch.compile's compile workers would otherwise keep running beside the first timings.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

RESULTS = []
SESSION = {}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _keep_freed_memory():
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve allocations up to 1 GiB from the heap
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never hand freed heap memory back


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


def median_seconds(fn, device, repeats=15):
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@pytest.fixture(scope="session")
def copy_bandwidth(device):
    """Bytes read + written per second by a device-to-device copy of 256 MiB: the ceiling for memory-bound ops."""
    src = torch.randn(64 * 2**20, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / seconds


@pytest.fixture
def measure(benchmark, device):
    """measure(op, impl, fn, bytes_moved): times fn with pytest-benchmark and records it for the summary."""

    def run(op, impl, fn, bytes_moved):
        benchmark.group = op

        def timed():
            fn()
            synchronize(device)

        benchmark.pedantic(timed, warmup_rounds=3, rounds=15, iterations=1)
        if benchmark.disabled:  # --benchmark-disable: a smoke run, timed once for the summary only
            median = median_seconds(timed, device, repeats=1)
        else:
            median = benchmark.stats.stats.median
        benchmark.extra_info.update(impl=impl, bytes=bytes_moved, gb_per_s=bytes_moved / median / 1e9)
        RESULTS.append({"op": op, "impl": impl, "seconds": median, "bytes": bytes_moved, "device": device})

    return run


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


def pytest_terminal_summary(terminalreporter, config):
    if not RESULTS:
        return
    device = RESULTS[0]["device"]
    bandwidth = SESSION.get("copy_bandwidth")
    baselines = {r["op"]: r["seconds"] for r in RESULTS if r["impl"] == "torch eager"}
    lines = [f"machine: {machine_description(device)}; torch {torch.__version__}"]
    if bandwidth:
        lines.append(f"measured copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write)")
    lines.append(f"{'op':<44} {'impl':<16} {'ms':>9} {'GB/s':>8} {'of copy':>8} {'vs eager':>9}")
    for r in RESULTS:
        gbps = r["bytes"] / r["seconds"] / 1e9
        r["gb_per_s"] = gbps
        r["fraction_of_copy"] = r["bytes"] / r["seconds"] / bandwidth if bandwidth else None
        r["speedup_vs_eager"] = baselines[r["op"]] / r["seconds"] if r["op"] in baselines else None
        fraction = f"{r['fraction_of_copy']:.0%}" if r["fraction_of_copy"] else "-"
        speedup = f"{r['speedup_vs_eager']:.2f}x" if r["speedup_vs_eager"] else "-"
        lines.append(f"{r['op']:<44} {r['impl']:<16} {r['seconds'] * 1e3:>9.3f} {gbps:>8.1f} {fraction:>8} "
                     f"{speedup:>9}")
    terminalreporter.write_sep("=", "aquila benchmark summary")
    for line in lines:
        terminalreporter.write_line(line)
    if config.getoption("--quick") or config.getoption("benchmark_disable", False):
        return
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_description(device), "device": device, "torch": torch.__version__,
              "python": platform.python_version(), "copy_bandwidth_bytes_per_s": bandwidth, "results": RESULTS}
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        pass
    folder = os.path.join(REPO, "benchmarks", "results")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"kernels-{device}-{datetime.date.today().isoformat()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)
    terminalreporter.write_line(f"written: {os.path.relpath(path, REPO)}")


@pytest.fixture(scope="session", autouse=True)
def _record_bandwidth(copy_bandwidth):
    SESSION["copy_bandwidth"] = copy_bandwidth
