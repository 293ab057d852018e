"""The decoding step on weights held in 4 KiB pages against the same weights in 2 MiB (transparent huge) pages, CPU.

A step reads every weight once per token. On 4 KiB pages that is a TLB miss every 4 KiB of weights, which under a
hypervisor is a two-level page walk; on 2 MiB pages, one every 2 MiB. aquila.model.checkpoint.load therefore asks
Linux for huge pages (madvise MADV_HUGEPAGE) over every tensor it allocates, before writing it. This measures what
that buys: for each precision, one model of Aquila-7B's widths (fewer layers, so that two copies fit in memory; random
weights) is copied twice, once into memory advised MADV_NOHUGEPAGE and once as load() allocates, and the two copies'
native decoding steps alternate within one process (blocks of steps, so that a load that comes and goes on the host
hits both alike). Reported per precision: each copy's share of its weight bytes the kernel actually placed in huge
pages (/proc/self/smaps: the kernel may fall back to small pages when memory is fragmented), each copy's step time
(spread and median over the blocks' medians), and the huge copy's speed relative to the small one, block by block.

    python benchmarks/huge_pages.py [--layers 8] [--blocks 10] [--out benchmarks/results/NAME.json]

Linux only (it reads /proc/self/smaps and needs madvise).
"""

import argparse
import dataclasses
import mmap
import platform
import statistics
import time

import torch
from report import host_record, write_results  # this script's folder is on the path when it runs
from torch import nn

from aquila import host
from aquila.model.checkpoint import advise_pages, empty_weight
from aquila.model.config import AquilaConfig
from aquila.model.model import Aquila, KVCache
from aquila.model.quantize import quantize_model

PRECISIONS = {"bf16": None, "int8": (8, None), "int4 g128": (4, 128)}
STEPS_PER_BLOCK = 5


def small_page_weight(shape, dtype):
    """torch.empty in memory advised MADV_NOHUGEPAGE before it is written: 4 KiB pages whatever the THP setting."""
    out = torch.empty(shape, dtype=dtype)
    refused = advise_pages(out, mmap.MADV_NOHUGEPAGE)
    if refused:
        raise OSError(refused, "madvise(MADV_NOHUGEPAGE) was refused")
    return out


def moved_into(model: nn.Module, allocate) -> nn.Module:
    """The model, each of its parameters and buffers moved into memory from allocate(shape, dtype)."""
    with torch.no_grad():
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for name, tensor in table.items():
                    if tensor is not None:
                        moved = allocate(tensor.shape, tensor.dtype).copy_(tensor)
                        table[name] = nn.Parameter(moved, requires_grad=False) if table is module._parameters \
                            else moved
    return model


def built(config: AquilaConfig, quantization, allocate) -> nn.Module:
    """A bf16 model of random weights (the same on every call), quantized as asked, in memory from allocate."""
    with torch.device("meta"):
        model = Aquila(config).to(torch.bfloat16)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    if quantization is not None:
        quantize_model(model, *quantization)
    return moved_into(model.eval(), allocate)


def huge_page_bytes_of(tensors) -> tuple[int, int]:
    """(bytes of these tensors the kernel placed in huge pages, their bytes), from /proc/self/smaps: each mapping's
    AnonHugePages counted over the tensors' share of that mapping (tensors larger than glibc's mmap threshold each
    get mappings of their own)."""
    spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors]
    total = sum(end - start for start, end in spans)
    huge = 0
    with open("/proc/self/smaps") as f:
        mapping = None
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
                mapping = tuple(int(bound, 16) for bound in fields[0].split("-"))
            elif fields[0] == "AnonHugePages:" and mapping is not None and int(fields[1]):
                inside = sum(max(0, min(end, mapping[1]) - max(start, mapping[0])) for start, end in spans)
                huge += min(inside, int(fields[1]) * 1024)
    return huge, total


def block_median(step, token):
    times = []
    for _ in range(STEPS_PER_BLOCK):
        start = time.perf_counter()
        step(token)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(config: AquilaConfig, name: str, quantization, blocks: int) -> dict:
    copies = {"4 KiB pages": built(config, quantization, small_page_weight),
              "huge pages (as load() allocates)": built(config, quantization,
                                                        lambda shape, dtype: empty_weight(shape, dtype, "cpu"))}
    record = {"precision": name, "copies": {}}
    steps = {}
    with torch.no_grad():
        for label, model in copies.items():
            huge, total = huge_page_bytes_of([*model.parameters(), *model.buffers()])
            record["copies"][label] = {"weight_bytes": total, "huge_page_share": huge / total, "block_medians_s": []}
            cache = KVCache(config, 1, 64, dtype=torch.bfloat16)
            model.forward_with_cache(torch.tensor([[1, 2, 3, 4]]), cache, last_only=True)
            steps[label] = model.decoder(cache)
        token = torch.tensor([[5]])
        labels = list(copies)
        for block in range(blocks):
            for label in labels if block % 2 == 0 else labels[::-1]:  # either copy first, in turn
                record["copies"][label]["block_medians_s"].append(block_median(steps[label], token))
    small, huge = (record["copies"][label]["block_medians_s"] for label in labels)
    record["huge_vs_small_per_block"] = [s / h for s, h in zip(small, huge)]
    for label, copy in record["copies"].items():
        values = copy["block_medians_s"]
        print(f"{name:9s} {label:33s} huge-page share {copy['huge_page_share']:6.1%}  step "
              f"{1e3 * min(values):6.1f}-{1e3 * max(values):6.1f} ms, median {1e3 * statistics.median(values):6.1f}",
              flush=True)
    ratios = record["huge_vs_small_per_block"]
    print(f"{name:9s} huge pages / 4 KiB pages: {min(ratios):.3f}-{max(ratios):.3f}x, median "
          f"{statistics.median(ratios):.3f}x, faster in {sum(r > 1 for r in ratios)} of {len(ratios)} blocks",
          flush=True)
    return record


def thp_setting(name):
    """The chosen value of a THP setting (the bracketed word of /sys/kernel/mm/transparent_hugepage/NAME)."""
    try:
        with open(f"/sys/kernel/mm/transparent_hugepage/{name}") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.find("[") + 1:text.find("]")] if "[" in text else text.strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="of Aquila-7B's width (default 8: 3.2 GB of bf16 "
                                                              "layers plus 1.6 GB of embeddings and output)")
    parser.add_argument("--blocks", type=int, default=10, help=f"blocks of {STEPS_PER_BLOCK} steps per copy")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated: " + ", ".join(PRECISIONS))
    parser.add_argument("--out", help="results file (JSON; a Markdown table beside it)")
    args = parser.parse_args()
    config = dataclasses.replace(AquilaConfig.preset("aquila-7b"), n_layers=args.layers)
    names = args.precisions.split(",")
    unknown = sorted(set(names) - set(PRECISIONS))
    if unknown:
        parser.error(f"--precisions: unknown {unknown}; choose from {list(PRECISIONS)}")
    records = [compare(config, name, PRECISIONS[name], args.blocks) for name in names]
    flags = host.cpu_flags() or set()
    record = {"host": host_record(kernel=platform.release(), virtual_machine="hypervisor" in flags,
                                  thp_enabled=thp_setting("enabled"), thp_defrag=thp_setting("defrag")),
              "model": {"preset": "aquila-7b", "n_layers": args.layers}, "steps_per_block": STEPS_PER_BLOCK,
              "blocks": args.blocks, "records": records}
    if args.out:
        write_results(args.out, record, markdown(record))


def markdown(record):
    h = record["host"]
    lines = ["# The decoding step on 4 KiB pages against huge pages, CPU", "",
             f"{h['cpu_model']}, ISA path {h['aquila_cpu_isa']}, {h['threads']} threads, Linux {h['kernel']}"
             f"{' (a virtual machine)' if h['virtual_machine'] else ''}, THP enabled {h['thp_enabled']}, defrag "
             f"{h['thp_defrag']}. Aquila-7B's widths with {record['model']['n_layers']} layers, random weights, "
             f"batch 1. Each copy's time is the median of {record['steps_per_block']} steps in a block; the copies "
             f"alternate over {record['blocks']} blocks; spread = min-max over the blocks.", "",
             "| precision | weights in | GB | in huge pages | step ms (spread) | median ms | huge / 4 KiB, per block "
             "(spread) | median | faster in |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in record["records"]:
        ratios = r["huge_vs_small_per_block"]
        for index, (label, copy) in enumerate(r["copies"].items()):
            values = copy["block_medians_s"]
            speed = (f"{min(ratios):.3f}-{max(ratios):.3f}x | {statistics.median(ratios):.3f}x | "
                     f"{sum(x > 1 for x in ratios)} of {len(ratios)} blocks") if index else "| |"
            lines.append(f"| {r['precision']} | {label} | {copy['weight_bytes'] / 1e9:.2f} | "
                         f"{copy['huge_page_share']:.0%} | {1e3 * min(values):.1f}-{1e3 * max(values):.1f} | "
                         f"{1e3 * statistics.median(values):.1f} | {speed} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
