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

from aquila import host
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


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def default_dtype(device):
    """The benchmarks' precision where a test names none: bf16 on GPU, fp32 on CPU."""
    return torch.bfloat16 if device == "cuda" else torch.float32


@pytest.fixture(params=["fp32", "bf16"])
def dtype(request, device):
    """The precision of a kernel benchmark, every contender's alike: bf16 on GPU; fp32 and bf16 on CPU, where which
    one is faster depends on the host (bf16 runs at several times fp32's speed with AMX, far slower with AVX2 alone).
    Op labels end with it."""
    if device == "cuda" and request.param == "fp32":
        pytest.skip("on GPU the benchmarks run in bf16")
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[request.param]


@pytest.fixture
def dtype_name(dtype):
    """fp32 or bf16: how op labels and records name the benchmark's dtype."""
    return DTYPE_NAMES[dtype]


def best_within(fn, device, repeats, budget_seconds):
    """(best time, runs timed): the best of `repeats` runs after a warm-up, fewer where they would take longer than
    budget_seconds (a bf16 matmul on a host without native bf16 takes seconds), but at least two."""
    fn()
    synchronize(device)
    times = []
    while len(times) < repeats and (len(times) < 2 or sum(times) < budget_seconds):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times), len(times)


CPU_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")


def cpu_flags():
    """{flag: present} for the ISA extensions that decide the CPU's fp32 and bf16 speed; {} where /proc/cpuinfo
    cannot be read."""
    flags = host.cpu_flags()
    return {} if flags is None else {flag: flag in flags for flag in CPU_FLAGS}


def native_isa():
    """The ISA path Aquila's attention and decoding kernels take in this process (aquila._C.cpu_isa()), or None
    without the CPU extension."""
    from aquila.kernels import backend

    return backend.cpu_extension.cpu_isa() if backend.cpu_extension is not None else None


def matmul_seconds(n, dtype, device):
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return best_within(lambda: a @ b, device, repeats=7, budget_seconds=5.0)


@pytest.fixture(scope="session")
def ceilings(device, quick):
    """What this host reaches, measured once per session in this process, for the summary's fractions:
    - matmul_flop_per_s: {dtype: FLOP/s} of an n x n x n matmul in fp32 and in bf16: the compute ceiling of ops in
      that dtype;
    - read_bytes_per_s: a sum over a 256 MiB fp32 tensor that has been written (fresh pages all map to the zero
      page, which stays in cache and reads at several times the memory's rate): the ceiling of ops that only read
      (decoding, which reads the weights; a loss forward);
    - copy_bytes_per_s: bytes read + written by a copy between two such tensors: the ceiling of ops that read and
      write (norms, rotary, a loss with its gradient).
    Each is the best of several runs: what the machine does when nothing is in the way. --quick measures smaller
    sizes, to check the code only."""
    n = (1024 if quick else 8192) if device == "cuda" else (512 if quick else 4096)
    rates, runs = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        best, runs[DTYPE_NAMES[dtype]] = matmul_seconds(n, dtype, device)
        rates[DTYPE_NAMES[dtype]] = 2 * n**3 / best
    src = torch.randn((4 if quick else 64) * 2**20, device=device)
    dst = torch.empty_like(src)  # written by the copy's warm-up run, before any timed one
    size = src.numel() * src.element_size()
    read = size / best_seconds(lambda: src.sum(), device, repeats=15)
    copy = 2 * size / best_seconds(lambda: dst.copy_(src), device, repeats=15)
    return {"matmul_flop_per_s": rates, "matmul_size": n, "matmul_runs": runs, "read_bytes_per_s": read,
            "copy_bytes_per_s": copy, "bandwidth_tensor_bytes": size, "statistic": "best of the runs",
            "threads": torch.get_num_threads()}


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
def measure(benchmark, device, quick):
    """measure(op, impl, fn, bytes_moved=None, flops=None, memory=False, rounds=15, dtype=None, reads_only=False):
    times fn with pytest-benchmark, optionally measures its extra peak memory, and records both for the summary (the
    record is returned, for a test to add to). dtype: the precision fn computes in (default_dtype(device) if None),
    whose matmul rate is the ceiling of its FLOP/s. reads_only: bytes_moved are reads alone (decoding reads weights or
    a cache; a loss forward reads logits), so the read bandwidth is their ceiling; otherwise the copy bandwidth.
    --quick keeps no timing, so it runs fn three times: enough to show that it runs."""

    def run(op, impl, fn, bytes_moved=None, flops=None, memory=False, rounds=15, dtype=None, reads_only=False):
        benchmark.group = op
        warmup_rounds = min(3, rounds)
        if quick:
            warmup_rounds, rounds = 1, 2

        def timed():
            fn()
            synchronize(device)

        benchmark.pedantic(timed, warmup_rounds=warmup_rounds, rounds=rounds, iterations=1)
        if benchmark.disabled:  # --benchmark-disable: a smoke run, timed once for the summary only
            median = median_seconds(timed, device, repeats=1)
        else:
            median = benchmark.stats.stats.median
        record = {"op": op, "impl": impl, "seconds": median, "bytes": bytes_moved, "flops": flops, "device": device,
                  "dtype": DTYPE_NAMES[dtype or default_dtype(device)],
                  "traffic": None if bytes_moved is None else "read" if reads_only else "copy"}
        if memory and (device == "cuda" or os.path.exists("/proc/self/clear_refs")):
            record["peak_extra_bytes"] = extra_peak_bytes(timed, device)
        benchmark.extra_info.update({k: v for k, v in record.items() if k not in ("op", "device")})
        RESULTS.append(record)
        return record

    return run


@pytest.fixture
def record(device):
    """record(op, impl, seconds, flops=None, dtype=None, **extra): adds a result measured elsewhere (in other
    processes) to the summary and the JSON."""

    def add(op, impl, seconds, flops=None, dtype=None, **extra):
        result = {"op": op, "impl": impl, "seconds": seconds, "bytes": None, "flops": flops, "device": device,
                  "dtype": DTYPE_NAMES[dtype or default_dtype(device)], "traffic": None, **extra}
        RESULTS.append(result)
        return result

    return add


def machine_description(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{host.cpu_model()}, {os.cpu_count()} cores"


def machine_section(device):
    """The host the numbers hold for: what it is, the ISA extensions that set its fp32 and bf16 speed, the path
    Aquila's kernels take on it, and the ceilings measured on it in this session."""
    section = {"description": machine_description(device), "cpu_model": host.cpu_model(), "cores": os.cpu_count(),
               "cpu_flags": cpu_flags(), "native_isa": native_isa(),
               "aquila_cpu_isa_env": os.environ.get("AQUILA_CPU_ISA"), "ceilings": SESSION.get("ceilings")}
    if device == "cuda":
        section["gpu"] = torch.cuda.get_device_name()
    return section


def describe_host(machine):
    """One line: the CPU flags present and the native kernels' ISA path."""
    flags = ", ".join(flag for flag, present in machine["cpu_flags"].items() if present) or "none of " + ", ".join(
        CPU_FLAGS)
    return f"ISA: {flags}; Aquila's kernels take the {machine['native_isa'] or '-'} path"


def describe_ceilings(ceilings):
    rates = ", ".join(f"{dtype} {rate / 1e9:.0f}" for dtype, rate in ceilings["matmul_flop_per_s"].items())
    return (f"read bandwidth {ceilings['read_bytes_per_s'] / 1e9:.1f} GB/s, copy "
            f"{ceilings['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write); matmul {ceilings['matmul_size']}^3 "
            f"GFLOP/s: {rates} ({ceilings['statistic']})")


def _format(value, pattern, scale=1.0):
    return "-" if value is None else pattern.format(value * scale)


def add_ratios(results, ceilings):
    """Each result's rates and their fractions of the ceiling that applies: the read bandwidth for reads alone, the
    copy bandwidth for reads and writes, the matmul rate of the result's dtype for FLOPs; and its speed relative to
    its op's baseline."""
    # The baseline of each op: torch eager, torch's SDPA for attention, transformers' generate for decoding.
    baselines = {r["op"]: r["seconds"] for r in results
                 if r["impl"] in ("torch eager", "torch sdpa", "transformers generate", "transformers",
                                  "transformers + deepspeed zero-2")}
    bandwidths = {"read": ceilings["read_bytes_per_s"], "copy": ceilings["copy_bytes_per_s"]} if ceilings else {}
    rates = ceilings["matmul_flop_per_s"] if ceilings else {}
    for r in results:
        r["gb_per_s"] = r["bytes"] / r["seconds"] / 1e9 if r["bytes"] else None
        if r["bytes"]:
            ceiling = bandwidths.get(r["traffic"])
            r[f"fraction_of_{r['traffic']}"] = r["bytes"] / r["seconds"] / ceiling if ceiling else None
        r["gflop_per_s"] = r["flops"] / r["seconds"] / 1e9 if r["flops"] else None
        if r["flops"] and rates.get(r["dtype"]):
            r["fraction_of_matmul"] = r["flops"] / r["seconds"] / rates[r["dtype"]]
        r["speedup_vs_baseline"] = baselines[r["op"]] / r["seconds"] if r["op"] in baselines else None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS:
        return
    device = RESULTS[0]["device"]
    ceilings = SESSION.get("ceilings")
    machine = machine_section(device)
    add_ratios(RESULTS, ceilings)
    lines = [f"machine: {machine['description']}; torch {torch.__version__}; {describe_host(machine)}"]
    if ceilings:
        lines.append(f"measured: {describe_ceilings(ceilings)}")
    width = max(48, *(len(r["op"]) for r in RESULTS))  # the op column fits the longest label
    lines.append(f"{'op':<{width}} {'impl':<16} {'ms':>9} {'GB/s':>7} {'of bw':>9} {'GFLOP/s':>8} {'of mm':>6} "
                 f"{'vs base':>8} {'peak MB':>8}")
    for r in RESULTS:
        fraction = r.get("fraction_of_read", r.get("fraction_of_copy"))
        cells = [_format(r["gb_per_s"], "{:.1f}"),
                 "-" if fraction is None else f"{fraction:.0%} {r['traffic']}",
                 _format(r["gflop_per_s"], "{:.0f}"), _format(r.get("fraction_of_matmul"), "{:.0%}"),
                 _format(r["speedup_vs_baseline"], "{:.2f}x"),
                 _format(r.get("peak_extra_bytes", r.get("peak_memory_bytes")), "{:.0f}", 1e-6)]
        lines.append(f"{r['op']:<{width}} {r['impl']:<16} {r['seconds'] * 1e3:>9.3f} {cells[0]:>7} {cells[1]:>9} "
                     f"{cells[2]:>8} {cells[3]:>6} {cells[4]:>8} {cells[5]:>8}")
    terminalreporter.write_sep("=", "aquila benchmark summary")
    for line in lines:
        terminalreporter.write_line(line)
    if config.getoption("--quick") or config.getoption("benchmark_disable", False):
        return
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine, "device": device, "torch": torch.__version__, "python": platform.python_version(),
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
def _record_ceilings(ceilings):
    SESSION["ceilings"] = ceilings
