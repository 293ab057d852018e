"""The spread of repeated benchmark runs: each (op, implementation) over several results files of the same machine.

    python benchmarks/spread.py RUN1.json RUN2.json RUN3.json --name NAME

writes results/NAME.json (every run's machine section and records, in order) and results/NAME.md (a table: for each
op and implementation, the lowest and highest of its time, of its speed relative to the op's baseline in the same run,
and of its fraction of the ceiling that applies, over the runs), and prints the table. A benchmark missing from a run
shows how many runs it has. The runs are those of `pytest benchmarks --benchmark-only -k ...`, moved out of results/
so that no partial run stands for the machine's full one.
"""

import argparse
import json
import os

from report import describe_machine, machine_of  # this script's folder is on the path when it runs

from aquila.files import AtomicFile

HERE = os.path.dirname(os.path.abspath(__file__))


def span(values, pattern):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    low, high = min(values), max(values)
    return pattern.format(low) if low == high else f"{pattern.format(low)}-{pattern.format(high)}"


def ceiling_fraction(record):
    for key, label in (("fraction_of_read", "read"), ("fraction_of_copy", "copy"), ("fraction_of_matmul", "matmul")):
        if record.get(key) is not None:
            return record[key], label
    return None, None


def table(runs):
    """Markdown rows over the runs' records, in the first run's order."""
    order, grouped = [], {}
    for run in runs:
        for record in run["results"]:
            key = (record["op"], record["impl"])
            if key not in grouped:
                order.append(key)
                grouped[key] = []
            grouped[key].append(record)
    lines = ["| op | implementation | runs | ms | vs baseline | of ceiling |", "| --- | --- | --- | --- | --- | --- |"]
    for key in order:
        records = grouped[key]
        fractions = [ceiling_fraction(r) for r in records]
        label = next((name for _, name in fractions if name), None)
        of_ceiling = span([f for f, _ in fractions], "{:.0%}") + (f" of {label}" if label else "")
        ratios = [r.get("speedup_vs_baseline") for r in records if r.get("speedup_vs_baseline") is not None]
        # A ratio exists only in the runs where the op's baseline ran too: say so when that is not every run.
        ratio = span(ratios, "{:.2f}x") + (f" ({len(ratios)} of {len(records)} runs)" if 0 < len(ratios) < len(records)
                                           else "")
        lines.append(f"| {key[0]} | {key[1]} | {len(records)} | {span([r['seconds'] * 1e3 for r in records], '{:.1f}')}"
                     f" | {ratio} | {of_ceiling} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="results files of repeated runs on one machine")
    parser.add_argument("--name", required=True, help="the output's name under results/ (NAME.json, NAME.md)")
    args = parser.parse_args(argv)
    runs = []
    for path in args.runs:
        with open(path) as f:
            runs.append(json.load(f))
    descriptions = {machine_of(run).get("description") for run in runs}
    if len(descriptions) != 1:
        raise SystemExit(f"spread: the runs come from different machines: {sorted(map(str, descriptions))}")
    text = (f"# {args.name}\n\n{len(runs)} runs on {descriptions.pop()}, from {runs[0]['date']} to "
            f"{runs[-1]['date']}. Each run's machine section (ISA, ceilings) is in {args.name}.json.\n\n"
            + "\n".join(f"- run {i + 1}: {describe_machine(run)}" for i, run in enumerate(runs))
            + "\n\nLowest-highest over the runs; the ratio and the fraction of the ceiling are taken within each run."
            + "\n\n" + table(runs) + "\n")
    results = os.path.join(HERE, "results")
    with AtomicFile(os.path.join(results, f"{args.name}.json"), "w") as out:
        json.dump({"name": args.name, "runs": runs}, out, indent=1)
    with AtomicFile(os.path.join(results, f"{args.name}.md"), "w") as out:
        out.write(text)
    print(text)


if __name__ == "__main__":
    main()
