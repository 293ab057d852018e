"""Renders a benchmark results JSON (default: the newest benchmarks/results/kernels-*.json) as a Markdown table, and
optionally as a PNG chart of every implementation's speed relative to the baseline of its op.

    python benchmarks/report.py [results.json ...] [--png chart.png]
"""

import argparse
import glob
import json
import os


def render(report):
    lines = [f"Machine: {report['machine']} ({report['device']}); torch {report['torch']}, "
             f"triton {report.get('triton', '-')}; {report['date']}. Copy bandwidth "
             f"{report['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (read + write).", "",
             "| op | implementation | ms | GB/s | of copy bandwidth | GFLOP/s | of matmul rate | vs baseline | "
             "peak MB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["results"]:
        cells = [cell(r.get("gb_per_s"), "{:.1f}"), cell(r.get("fraction_of_copy"), "{:.0%}"),
                 cell(r.get("gflop_per_s"), "{:.0f}"), cell(r.get("fraction_of_matmul"), "{:.0%}"),
                 cell(r.get("speedup_vs_baseline", r.get("speedup_vs_eager")), "{:.2f}x"),
                 cell(r.get("peak_extra_bytes", r.get("peak_memory_bytes")), "{:.0f}", 1e-6)]
        lines.append(f"| {r['op']} | {r['impl']} | {r['seconds'] * 1e3:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cell(value, pattern, scale=1.0):
    return "-" if value is None else pattern.format(value * scale)


def chart(report, path):
    """One horizontal bar per (op, implementation) that is not its op's baseline: speed relative to the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r.get("speedup_vs_baseline") not in (None, 1.0)]
    if not rows:
        raise ValueError("no result has a ratio to a baseline to plot")
    labels = [f"{r['op']} | {r['impl']}" for r in rows]
    ratios = [r["speedup_vs_baseline"] for r in rows]
    figure, axes = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.2))
    colors = ["tab:green" if "aquila" in r["impl"] else "tab:gray" for r in rows]
    axes.barh(range(len(rows)), ratios, color=colors)
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_yticks(range(len(rows)), labels, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("speed relative to the op's baseline (torch eager, SDPA, transformers or DeepSpeed); > 1 is faster")
    axes.set_title(f"{report['machine']}, {report['date']}", fontsize=9)
    figure.tight_layout()
    temporary = path + ".tmp.png"
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    os.replace(temporary, path)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", help="results JSON files (default: the newest kernels-*.json)")
    parser.add_argument("--png", help="also draw the ratios to the baselines into this PNG (of the last file)")
    args = parser.parse_args()
    # Default: the newest by the date in the name (kernels-<device>-<date>.json), whatever the modification times.
    paths = args.paths or [max(glob.glob(os.path.join(here, "results", "kernels-*.json")),
                               key=lambda path: os.path.basename(path).split("-", 2)[2])]
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        print(render(report))
    if args.png:
        chart(report, args.png)


if __name__ == "__main__":
    main()
