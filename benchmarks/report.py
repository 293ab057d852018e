"""Renders a benchmark results JSON (default: the newest under benchmarks/results/) as a Markdown table.

    python benchmarks/report.py [results.json]
"""

import glob
import json
import os
import sys


def render(report):
    lines = [f"Machine: {report['machine']} ({report['device']}); torch {report['torch']}, "
             f"triton {report.get('triton', '-')}; {report['date']}. Copy bandwidth "
             f"{report['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (read + write).", "",
             "| op | implementation | ms | GB/s | of copy bandwidth | GFLOP/s | of matmul rate | vs baseline | "
             "extra peak MB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["results"]:
        cells = [cell(r.get("gb_per_s"), "{:.1f}"), cell(r.get("fraction_of_copy"), "{:.0%}"),
                 cell(r.get("gflop_per_s"), "{:.0f}"), cell(r.get("fraction_of_matmul"), "{:.0%}"),
                 cell(r.get("speedup_vs_baseline", r.get("speedup_vs_eager")), "{:.2f}x"),
                 cell(r.get("peak_extra_bytes"), "{:.0f}", 1e-6)]
        lines.append(f"| {r['op']} | {r['impl']} | {r['seconds'] * 1e3:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cell(value, pattern, scale=1.0):
    return "-" if value is None else pattern.format(value * scale)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    paths = sys.argv[1:] or [max(glob.glob(os.path.join(here, "results", "*.json")), key=os.path.getmtime)]
    for path in paths:
        with open(path) as f:
            print(render(json.load(f)))


if __name__ == "__main__":
    main()
