"""A quantized linear layer's prefill on CPU, at Aquila-7B's widths: the int8-input GEMM (on AMX tiles or vpdpbusd)
against the other ways to multiply a prompt by quantized weights, and against torch's bf16 matmul of the dense weights.

For each layer shape (out x in) and prompt length (rows), each in bf16 and alternating within one process (so that
a load that comes and goes hits each alike), it times:
  - dense bf16: torch's matmul of the bf16 weights (the unquantized model's prefill, the bar to beat);
  - bf16 inputs: aquila.kernels.quantized_linear of int8 / int4 g128 weights without int8_inputs (on CPUs with
    AVX512-BF16, from 32 rows: the weights dequantized to bf16 a chunk at a time, then torch's matmul; below, the
    fp32 kernels);
  - int8 inputs: aquila.kernels.quantized_linear(..., int8_inputs=True) (the GEMM on AMX tiles where the CPU has
    AMX-INT8, on vpdpbusd where it has AVX512-VNNI; the rounded x through the fp32 kernels elsewhere). On an AMX CPU,
    AQUILA_CPU_ISA=avx512 runs the vpdpbusd GEMM instead (and torch's matmul as before), for a second record.
It reports, per row, the time's spread (min-max over the repeats), the median, and the median's ratio to dense bf16;
and the host's matmul rate in bf16, its VNNI and AMX flags, and which GEMM ran.

    python benchmarks/quantized_prefill.py [--repeats 7] [--out benchmarks/results/NAME.json]
"""

import argparse
import statistics
import time

import torch
from report import host_record, write_results  # this script's folder is on the path when it runs

from aquila import host
from aquila.kernels import backend, quantized_linear
from aquila.model.quantize import quantize_tensor

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in): attention, w1/w3, w2
ROWS = [16, 64, 256, 1024]
GROUP_SIZE = 128


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bf16_matmul_rate(size=2048):
    a, b = torch.randn(size, size, dtype=torch.bfloat16), torch.randn(size, size, dtype=torch.bfloat16)
    a @ b
    return 2 * size**3 / statistics.median(seconds(lambda: a @ b) for _ in range(5))


def contenders(x, dense, layers):
    """{name: callable} for one shape and prompt."""
    runs = {"dense bf16": lambda: x @ dense.T}
    for name, (bits, qweight, scales) in layers.items():
        group_size = GROUP_SIZE if bits == 4 else None
        for int8_inputs, label in ((False, "bf16 inputs"), (True, "int8 inputs")):
            runs[f"{name} {label}"] = (lambda q=qweight, s=scales, b=bits, g=group_size, i=int8_inputs:
                                       quantized_linear(x, q, s, bits=b, group_size=g, int8_inputs=i))
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", help="results file (JSON; a Markdown table beside it)")
    args = parser.parse_args()
    torch.manual_seed(0)
    records = []
    with torch.no_grad():
        for out_features, in_features in SHAPES:
            dense = (torch.randn(out_features, in_features) * in_features**-0.5).to(torch.bfloat16)
            layers = {"int8": (8, *quantize_tensor(dense, 8, None, True)[:2]),
                      "int4 g128": (4, *quantize_tensor(dense, 4, GROUP_SIZE, True)[:2])}
            for rows in ROWS:
                x = torch.randn(rows, in_features, dtype=torch.bfloat16)
                runs = contenders(x, dense, layers)
                times = {name: [] for name in runs}
                for run in runs.values():
                    run()  # first touches and one-off choices
                for _ in range(args.repeats):
                    for name, run in runs.items():
                        times[name].append(seconds(run))
                baseline = statistics.median(times["dense bf16"])
                for name, values in times.items():
                    median = statistics.median(values)
                    records.append({"shape": [out_features, in_features], "rows": rows, "contender": name,
                                    "seconds": values, "median_s": median, "vs_dense_bf16": baseline / median,
                                    "gops": 2 * rows * out_features * in_features / median / 1e9})
                    print(f"{out_features}x{in_features} rows {rows:4d} {name:22s} {1e3 * min(values):7.2f}-"
                          f"{1e3 * max(values):7.2f} ms  median {1e3 * median:7.2f}  {baseline / median:5.2f}x dense",
                          flush=True)
    flags = host.cpu_flags() or set()
    record = {"host": host_record(vnni=backend.cpu_int8_products(), amx=backend.cpu_extension.cpu_amx(),
                                  avx512_vnni_flag="avx512_vnni" in flags, amx_flag="amx_int8" in flags),
              "bf16_matmul_flop_per_s": bf16_matmul_rate(), "repeats": args.repeats, "records": records}
    if args.out:
        write_results(args.out, record, markdown(record))


def gemm_of(host_record):
    """Which GEMM the int8-input rows ran on (records before the AMX one have no "amx")."""
    if host_record.get("amx"):
        return "AMX tiles"
    return "vpdpbusd" if host_record["vnni"] else "the fp32 kernels"


def markdown(record):
    h = record["host"]
    lines = ["# A quantized layer's prefill, CPU, bf16", "",
             f"{h['cpu_model']}, ISA path {h['aquila_cpu_isa']}, VNNI {'yes' if h['vnni'] else 'no'}, AMX "
             f"{'yes' if h['amx_flag'] else 'no'}; int8 inputs on {gemm_of(h)}; {h['threads']} threads; torch's bf16 "
             f"matmul {record['bf16_matmul_flop_per_s'] / 1e9:.0f} GFLOP/s (2048^3). {record['repeats']} repeats, "
             "contenders alternating; spread = min-max, ratio = dense bf16's median / the median.", "",
             "| layer (out x in) | rows | contender | ms (spread) | median ms | vs dense bf16 | GOP/s |",
             "|---|---|---|---|---|---|---|"]
    for r in record["records"]:
        lines.append(f"| {r['shape'][0]} x {r['shape'][1]} | {r['rows']} | {r['contender']} | "
                     f"{1e3 * min(r['seconds']):.2f}-{1e3 * max(r['seconds']):.2f} | {1e3 * r['median_s']:.2f} | "
                     f"{r['vs_dense_bf16']:.2f}x | {r['gops']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
