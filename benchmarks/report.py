"""Generates benchmarks/README.md and a chart per machine kind from the benchmark results.

    python benchmarks/report.py                  # writes benchmarks/README.md and results/kernels-<kind>.svg
    python benchmarks/report.py --check          # exits 1 if README.md differs from what the results give
    python benchmarks/report.py FILE.json ...    # prints each file's table instead

The page is benchmarks/README.template.md filled in: {results} becomes a table of the newest
results/kernels-<kind>-<date>.json of every machine kind (cpu, cuda), every op labelled with its precision (records
from before it was recorded: fp32 on CPU, bf16 on GPU), then, where the run has the whole training step, Aquila's
speed relative to each contender in the same precision against the targets; every other {name} is a figure computed by
cpu_figures() from the newest CPU results and results/history.csv (earlier runs: the rows of the benchmarks whose
spread over runs the page quotes). The prose around the figures was written for those runs: when a new run
replaces one, read the page again. Each output is written atomically, and the same inputs give the same bytes.
"""

import argparse
import csv
import glob
import io
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
TEMPLATE = os.path.join(HERE, "README.template.md")
OUTPUT = os.path.join(HERE, "README.md")
HISTORY = os.path.join(RESULTS, "history.csv")



def machine_of(report):
    """The results file's machine section: a dict since the ceilings and ISA are recorded; before that, a description
    string, with the copy bandwidth and the matmul rate of the benchmarks' dtype (fp32 on CPU, bf16 on GPU) at the
    top level. Fields a file lacks stay None: nothing is filled in."""
    machine = report["machine"]
    if isinstance(machine, dict):
        return machine
    rate = report.get("matmul_flop_per_s")
    dtype = "bf16" if report["device"] == "cuda" else "fp32"
    return {"description": machine, "cpu_flags": None, "native_isa": None,
            "ceilings": {"read_bytes_per_s": None, "copy_bytes_per_s": report.get("copy_bandwidth_bytes_per_s"),
                         "matmul_flop_per_s": {dtype: rate} if rate else {}, "matmul_size": None,
                         "statistic": "best of the runs"}}


def describe_machine(report):
    """The sentences under a results table's title: the host's ISA, the ceilings measured in the run, and what the
    file does not record."""
    machine = machine_of(report)
    ceilings = machine.get("ceilings") or {}
    rates = ceilings.get("matmul_flop_per_s") or {}
    size = f" ({ceilings['matmul_size']}^3)" if ceilings.get("matmul_size") else ""
    measured, missing = [], []
    for value, text, name in [
            (ceilings.get("read_bytes_per_s"), "read bandwidth {:.1f} GB/s", "the read bandwidth"),
            (ceilings.get("copy_bytes_per_s"), "copy bandwidth {:.1f} GB/s (read + write)", "the copy bandwidth"),
            (rates.get("fp32"), "fp32 matmul {:.0f} GFLOP/s" + size, "the fp32 matmul rate"),
            (rates.get("bf16"), "bf16 matmul {:.0f} GFLOP/s" + size, "the bf16 matmul rate")]:
        if value:
            measured.append(text.format(value / 1e9))
        else:
            missing.append(name)
    text = f"Ceilings measured in the run, {ceilings.get('statistic', 'best of the runs')}: {', '.join(measured)}."
    if machine.get("cpu_flags") is None:
        missing.append("the CPU's ISA flags and the kernels' ISA path")
    else:
        present = [flag for flag, on in machine["cpu_flags"].items() if on]
        absent = [flag for flag, on in machine["cpu_flags"].items() if not on]
        text += " CPU flags: " + (", ".join(present) or "none") + (f" (not {', '.join(absent)})" if absent else "")
        text += f"; Aquila's CPU kernels take the {machine.get('native_isa') or '-'} path"
        if machine.get("aquila_cpu_isa_env"):
            text += f" (AQUILA_CPU_ISA={machine['aquila_cpu_isa_env']})"
        text += "."
    if missing:
        text += f" Not recorded (results from before they were measured): {', '.join(missing)}."
    return text


def dtype_of(result, device):
    """The precision of a result: its record's, or for records from before it was recorded the benchmarks' precision
    then (fp32 on CPU, bf16 on GPU)."""
    return result.get("dtype") or default_dtype(device)


def label(result, device):
    """The op's label ending with its precision, as labels are written since bf16 runs on CPU; older labels lack it."""
    dtype = dtype_of(result, device)
    return result["op"] if result["op"].endswith(f", {dtype}") else f"{result['op']}, {dtype}"


def render(report):
    """The Markdown table of one results JSON, then the whole training step's ratios where the run has it."""
    interrupted = " Interrupted: a partial run." if report.get("interrupted") else ""
    lines = [f"Machine: {machine_of(report)['description']} ({report['device']}); torch {report['torch']}, "
             f"triton {report.get('triton', '-')}; {report['date']}.{interrupted} {describe_machine(report)}", "",
             "| op | implementation | ms | GB/s | of bandwidth | GFLOP/s | of matmul rate | vs baseline | peak MB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["results"]:
        cells = [cell(r.get("gb_per_s"), "{:.1f}"), bandwidth_cell(r),
                 cell(r.get("gflop_per_s"), "{:.0f}"), cell(r.get("fraction_of_matmul"), "{:.0%}"),
                 cell(r.get("speedup_vs_baseline", r.get("speedup_vs_eager")), "{:.2f}x"),
                 cell(r.get("peak_extra_bytes", r.get("peak_memory_bytes")), "{:.0f}", 1e-6)]
        lines.append(f"| {label(r, report['device'])} | {r['impl']} | {r['seconds'] * 1e3:.2f} | " + " | ".join(cells)
                     + " |")
    training = render_training_step(report)
    return "\n".join(lines) + (f"\n\n{training}" if training else "")


# The whole training step's contenders, in the order of their columns (others a run may add follow), and the speed
# Aquila is to reach against each: at least 1.5x DeepSpeed ZeRO-2 and Megatron-core's distributed optimizer, and
# ahead of transformers + torch.compile, with each of its engines and in each precision.
STEP_CONTENDERS = ["transformers + deepspeed zero-2", "megatron-core distributed optimizer", "megatron-core ddp",
                   "transformers sdpa + torch.compile, ddp"]
STEP_TARGETS = {"transformers + deepspeed zero-2": (1.5, "DeepSpeed"),
                "megatron-core distributed optimizer": (1.5, "Megatron distributed optimizer"),
                "transformers sdpa + torch.compile, ddp": (1.0, "torch.compile")}


def training_step_ratios(report):
    """[(op, precision, Aquila's implementation, {contender: its seconds over Aquila's})] for each whole training
    step of the run (one op per shape and precision; the op without its precision) and each of Aquila's engines in
    it: ratios only between results of the same op, hence the same shape and precision."""
    by_op = {}
    for r in report["results"]:
        if r["op"].startswith("training step "):
            by_op.setdefault(r["op"], []).append(r)
    table = []
    for results in by_op.values():
        contenders = [r for r in results if not r["impl"].startswith("aquila")]
        for mine in (r for r in results if r["impl"].startswith("aquila")):
            dtype = dtype_of(mine, report["device"])
            table.append((label(mine, report["device"]).removesuffix(f", {dtype}"), dtype, mine["impl"],
                          {r["impl"]: r["seconds"] / mine["seconds"] for r in contenders}))
    return table


def targets_cell(ratios):
    """Whether Aquila meets the targets against the contenders that ran, and which did not run."""
    # "Ahead of" torch.compile is strictly faster; "at least" 1.5x the others includes 1.5x.
    missed = [f"{name} {ratios[impl]:.2f}x" for impl, (target, name) in STEP_TARGETS.items()
              if impl in ratios and (ratios[impl] <= target if target == 1.0 else ratios[impl] < target)]
    absent = [name for impl, (_, name) in STEP_TARGETS.items() if impl not in ratios]
    text = "missed: " + ", ".join(missed) if missed else "met"
    return text + (f" (not run: {', '.join(absent)})" if absent else "")


def render_training_step(report):
    """The whole training step's table: per shape and precision, each of Aquila's engines against each contender in
    the same precision; "" where the run has no training step."""
    table = training_step_ratios(report)
    if not table:
        return ""
    columns = STEP_CONTENDERS + sorted({impl for *_, ratios in table for impl in ratios} - set(STEP_CONTENDERS))
    lines = ["Whole training step: Aquila's speed relative to each contender in the same precision (the contender's "
             "seconds per step over Aquila's; > 1 is faster). Targets: at least 1.5x transformers + DeepSpeed ZeRO-2 "
             "and Megatron-core's distributed optimizer, ahead of transformers + torch.compile.", "",
             "| op | precision | Aquila | " + " | ".join(f"vs {impl}" for impl in columns) + " | targets |",
             "| --- | --- | --- | " + " | ".join("---:" for _ in columns) + " | --- |"]
    for op, dtype, impl, ratios in table:
        cells = [cell(ratios.get(contender), "{:.2f}x") for contender in columns]
        lines.append(f"| {op} | {dtype} | {impl} | " + " | ".join(cells) + f" | {targets_cell(ratios)} |")
    return "\n".join(lines)


def cell(value, pattern, scale=1.0):
    return "-" if value is None else pattern.format(value * scale)


def bandwidth_cell(r):
    """The fraction of the bandwidth that bounds the result: reads alone against the read bandwidth, reads and writes
    against the copy bandwidth (every result of a file from before the read bandwidth was measured)."""
    for kind in ("read", "copy"):
        if r.get(f"fraction_of_{kind}") is not None:
            return f"{r[f'fraction_of_{kind}']:.0%} of {kind}"
    return "-"


def chart_svg(report):
    """One horizontal bar per (op, implementation) that is not its op's baseline: speed relative to the baseline.
    SVG text with fixed ids and no date, so the same results draw the same bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r.get("speedup_vs_baseline") not in (None, 1.0)]
    if not rows:
        raise ValueError("no result has a ratio to a baseline to plot")
    with matplotlib.rc_context({"svg.hashsalt": "aquila", "svg.fonttype": "none"}):
        figure, axes = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.2))
        colors = ["tab:green" if "aquila" in r["impl"] else "tab:gray" for r in rows]
        axes.barh(range(len(rows)), [r["speedup_vs_baseline"] for r in rows], color=colors)
        axes.axvline(1.0, color="black", linewidth=0.8)
        axes.set_yticks(range(len(rows)), [f"{label(r, report['device'])} | {r['impl']}" for r in rows], fontsize=7)
        axes.invert_yaxis()
        axes.set_xlabel("speed relative to the op's baseline (torch eager, SDPA, transformers or DeepSpeed); "
                        "> 1 is faster")
        axes.set_title(f"{machine_of(report)['description']}, {report['date']}", fontsize=9)
        figure.tight_layout()
        out = io.StringIO()
        figure.savefig(out, format="svg", metadata={"Date": None})
        plt.close(figure)
    return out.getvalue()


def newest_per_kind():
    """{kind: path} of the newest results/kernels-<kind>-<date>.json of each kind, by the date in the name."""
    newest = {}
    for path in sorted(glob.glob(os.path.join(RESULTS, "kernels-*-*.json"))):
        kind, stamp = os.path.basename(path)[len("kernels-"):-len(".json")].split("-", 1)
        if kind not in newest or stamp > newest[kind][0]:
            if kind in newest:
                print(f"report: {os.path.relpath(newest[kind][1], HERE)} is older than "
                      f"{os.path.basename(path)}: not used", file=sys.stderr)
            newest[kind] = (stamp, path)
    return {kind: path for kind, (stamp, path) in sorted(newest.items())}


# ---- the figures the page quotes: rows from the newest run and from the history, in one shape ----

def rows_of_report(report):
    rows = []
    for r in report["results"]:
        peak = r.get("peak_extra_bytes", r.get("peak_memory_bytes"))
        rows.append({"date": report["date"], "op": r["op"], "impl": r["impl"], "ms": r["seconds"] * 1e3,
                     "dtype": r.get("dtype", default_dtype(report["device"])),
                     "vs_baseline": r.get("speedup_vs_baseline"), "of_copy": r.get("fraction_of_copy"),
                     "of_read": r.get("fraction_of_read"), "of_matmul": r.get("fraction_of_matmul"),
                     "peak_mb": None if peak is None else peak / 1e6})
    return rows


def default_dtype(device):
    """The dtype of results that do not name one: every benchmark ran in fp32 on CPU and bf16 on GPU until bf16 ran
    on CPU too."""
    return "bf16" if device == "cuda" else "fp32"


def read_history(device):
    with open(HISTORY, newline="") as f:
        rows = [{key: (value if key in ("date", "device", "op", "impl", "dtype") else float(value) if value else None)
                 for key, value in row.items()} for row in csv.DictReader(f) if row["device"] == device]
    for row in rows:
        row["dtype"] = row.get("dtype") or default_dtype(device)
    return rows


def pick(rows, op, impl):
    """Rows whose op matches the regular expression `op` (from its start) and whose implementation is `impl`."""
    return [r for r in rows if re.match(op, r["op"]) and r["impl"] == impl]


def paired(rows, op, impl, other, value):
    """value(row of impl, row of other) for every run and op where both implementations ran."""
    others = {(r["date"], r["op"]): r for r in pick(rows, op, other)}
    return [value(r, others[r["date"], r["op"]]) for r in pick(rows, op, impl) if (r["date"], r["op"]) in others]


def span(values, pattern):
    """'low to high' in the pattern, or one value when both read the same."""
    if not values:
        raise ValueError("no result to quote: the template asks for a benchmark the results lack")
    low, high = pattern.format(min(values)), pattern.format(max(values))
    return low if low == high else f"{low} to {high}"


def runs(rows):
    return len({r["date"] for r in rows})


def faster(mine, theirs):
    return theirs["ms"] / mine["ms"]


def memory(mine, theirs):
    return mine["peak_mb"] / theirs["peak_mb"]


def ceiling_of(rows):
    """'N% of the read bandwidth' (or of the copy bandwidth, in results from before the read bandwidth was
    measured)."""
    reads = [r["of_read"] for r in rows if r.get("of_read") is not None]
    if reads:
        return span(reads, "{:.0%}") + " of the read bandwidth"
    return span([r["of_copy"] for r in rows], "{:.0%}") + " of the copy bandwidth"


def cpu_figures(report, history):
    """The page's figures: the fp32 rows of the newest CPU run and of the history (the readings on CPU are about
    fp32; bf16 results are in the table)."""
    latest = [r for r in rows_of_report(report) if r["dtype"] == "fp32"]
    history = [r for r in history if r["dtype"] == "fp32"]
    every = latest + history
    ratio = "{:.2f}x"
    norms = r"(rms_norm|rms_norm\+residual|rotary q\+k)"
    norm_fwd, norm_bwd = norms + r" fwd ", norms + r" fwd\+bwd "
    attention, decode = r"attention ", r"decode attention "
    generation_1, generation_8 = r"greedy generation, batch 1,", r"greedy generation, batch 8,"
    step = r"training step 2x2x512"
    patched = r"llama (training step|forward\+backward) "
    return {
        "machine": machine_of(report)["description"],
        "norm_fwd": span([r["vs_baseline"] for r in pick(latest, norm_fwd, "aquila cpu")], ratio),
        "norm_fwd_copy": span([r["of_copy"] for r in pick(latest, norm_fwd, "aquila cpu")], "{:.0%}"),
        "norm_fwd_compile": span(paired(latest, norm_fwd, "aquila cpu", "torch.compile", faster), ratio),
        "norm_bwd": span([r["vs_baseline"] for r in pick(latest, norm_bwd, "aquila cpu")], ratio),
        "norm_bwd_compile": span(paired(latest, norm_bwd, "aquila cpu", "torch.compile", faster), ratio),
        "ce_fwd": span([r["vs_baseline"] for r in pick(latest, r"cross_entropy fwd ", "aquila cpu")], ratio),
        "ce_bwd": span([r["vs_baseline"] for r in pick(latest, r"cross_entropy fwd\+bwd ", "aquila cpu")], ratio),
        "ce_bwd_compile": span(paired(latest, r"cross_entropy fwd\+bwd ", "aquila cpu", "torch.compile", faster),
                               ratio),
        "ce_memory": span(paired(latest, r"cross_entropy fwd\+bwd ", "aquila cpu", "torch eager", memory), "{:.0%}"),
        "lce": span([r["vs_baseline"] for r in pick(every, r"linear_cross_entropy fwd\+bwd ", "aquila cpu")], ratio),
        "lce_runs": runs(pick(every, r"linear_cross_entropy fwd\+bwd ", "aquila cpu")),
        "lce_memory": span(paired(latest, r"linear_cross_entropy fwd\+bwd ", "aquila cpu", "torch eager", memory),
                           "{:.0%}"),
        "lce_lean": span([r["vs_baseline"] for r in pick(every, r"linear_cross_entropy fwd\+bwd ",
                                                         "aquila cpu, lean")], ratio),
        "lce_lean_memory": span(paired(latest, r"linear_cross_entropy fwd\+bwd ", "aquila cpu, lean", "torch eager",
                                       memory), "{:.0%}"),
        "attention": span([r["vs_baseline"] for r in pick(every, attention, "aquila cpu")], ratio),
        "attention_runs": runs(pick(every, attention, "aquila cpu")),
        "attention_matmul": span([r["of_matmul"] for r in pick(every, attention, "aquila cpu")], "{:.0%}"),
        "attention_eager": span(paired(latest, attention, "aquila cpu", "torch eager", faster), "{:.1f}x"),
        "attention_compile": span(paired(latest, attention, "aquila cpu", "torch.compile", faster), "{:.1f}x"),
        "attention_memory_2048": span(paired(latest, attention + r".*2048", "aquila cpu", "torch eager", memory),
                                      "{:.0%}"),
        "decode": span([r["vs_baseline"] for r in pick(every, decode, "aquila cpu")], ratio),
        "decode_eager": span(paired(every, decode, "aquila cpu", "torch eager", faster), "{:.1f}x"),
        "decode_runs": runs(pick(every, decode, "aquila cpu")),
        "generation_1_now": span([r["vs_baseline"] for r in pick(latest, generation_1, "aquila")], ratio),
        "generation_1": span([r["vs_baseline"] for r in pick(every, generation_1, "aquila")], ratio),
        "generation_runs": runs(pick(every, generation_1, "aquila")),
        "generation_1_transformers_ms": span([r["ms"] for r in pick(every, generation_1, "transformers generate")],
                                             "{:.0f}"),
        "generation_1_aquila_ms": span([r["ms"] for r in pick(every, generation_1, "aquila")], "{:.0f}"),
        "generation_1_ceiling": ceiling_of(pick(every, generation_1, "aquila")),
        "generation_8": span([r["vs_baseline"] for r in pick(every, generation_8, "aquila")], ratio),
        "patch_step": span([r["vs_baseline"] for r in pick(every, r"llama training step ", "transformers + aquila")],
                           ratio),
        "patch_forward_backward": span([r["vs_baseline"] for r in pick(every, r"llama forward\+backward ",
                                                                       "transformers + aquila")], ratio),
        "patch_memory": span(paired(every, patched, "transformers + aquila", "transformers", memory), "{:.2f}x"),
        "patch_runs": runs(pick(every, patched, "transformers + aquila")),
        "step_ddp_now": span([r["vs_baseline"] for r in pick(latest, step, "aquila ddp")], ratio),
        "step_ddp": span([r["vs_baseline"] for r in pick(every, step, "aquila ddp")], ratio),
        "step_ddp_runs": runs(pick(every, step, "aquila ddp")),
        "step_ddp_at_target": sum(r["vs_baseline"] >= 1.5 for r in pick(every, step, "aquila ddp")),
        "step_ddp_memory": span(paired(every, step, "aquila ddp", "transformers + deepspeed zero-2",
                                       lambda mine, theirs: 1 - mine["peak_mb"] / theirs["peak_mb"]), "{:.0%}"),
        "step_compile": span([r["vs_baseline"] for r in pick(every, step, "transformers sdpa + torch.compile, ddp")],
                             ratio),
        "step_fsdp": span([r["vs_baseline"] for r in pick(every, step, "aquila fsdp2 zero-2")], ratio),
        "step_runs": runs(pick(every, step, "transformers + deepspeed zero-2")),
    }


def page():
    """The text of benchmarks/README.md, and {svg path: svg text} of the charts."""
    newest = newest_per_kind()
    if "cpu" not in newest:
        raise SystemExit("report: no results/kernels-cpu-*.json, which the page's readings quote")
    sections, charts, figures = [], {}, {}
    for kind, path in newest.items():
        with open(path) as f:
            report = json.load(f)
        chart = f"results/kernels-{kind}.svg"
        sections.append(f"### {kind.upper()}\n\nFrom `results/{os.path.basename(path)}`; "
                        f"chart: [`{chart}`]({chart}).\n\n{render(report)}")
        charts[os.path.join(HERE, chart)] = chart_svg(report)
        if kind == "cpu":
            figures = cpu_figures(report, read_history("cpu"))
    with open(TEMPLATE, encoding="utf-8") as f:
        template = f.read()
    return template.format_map({"results": "\n\n".join(sections), **figures}), charts


def host_record(**more):
    """What a CPU benchmark's record says of its host: the CPU, its cores, torch's threads and the kernels' ISA path
    (aquila._C.cpu_isa()), and `more`."""
    import torch

    from aquila import host
    from aquila.kernels import backend

    return {"cpu_model": host.cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "aquila_cpu_isa": backend.cpu_extension.cpu_isa(), **more}


def write_results(path, record, markdown):
    """Writes a benchmark script's record as JSON to path and its Markdown summary beside it (path's name with .md),
    each atomically."""
    from aquila.files import write_text_atomically

    write_text_atomically(path, json.dumps(record, indent=1))
    write_text_atomically(os.path.splitext(path)[0] + ".md", markdown)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", help="results JSON files to print as tables (default: write the page)")
    parser.add_argument("--check", action="store_true", help="only compare README.md with what it should be")
    args = parser.parse_args()
    if args.paths:
        for path in args.paths:
            with open(path) as f:
                print(render(json.load(f)), end="\n\n")
        return
    text, charts = page()
    sys.path.insert(0, os.path.dirname(HERE))  # this checkout's aquila, whatever is installed
    from aquila.files import write_text_atomically

    if args.check:
        with open(OUTPUT, encoding="utf-8") as f:
            if f.read() != text:
                raise SystemExit("report: benchmarks/README.md is out of date: run python benchmarks/report.py")
        return
    write_text_atomically(OUTPUT, text)
    for path, svg in charts.items():
        write_text_atomically(path, svg)
    print(f"written: {os.path.relpath(OUTPUT)}, " + ", ".join(os.path.relpath(path) for path in charts))


if __name__ == "__main__":
    main()
