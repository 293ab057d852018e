"""Compiles every Triton kernel as the launchers launch it, for sm_80 (A100) and sm_90 (H100/H200), without a GPU.

    python tests/kernels/triton_compile_check.py [--all] [--targets 80,90] [--workers 2] [--prewarm] [--list]

The launchers of aquila/kernels/triton/*.py (forward, backward, rotate, row_losses) are driven over the shapes, dtypes
and flags they take (each module's launch_cases(); the CI set by default, every case with --all) with their kernels
replaced by recorders (tests/kernels/launch_capture.py). Each distinct launch (kernel, constexprs, launch options, and
the specialisation Triton gives its arguments: dtypes, 16-byte alignment, ints equal to 1 or divisible by 16) is then
compiled in worker processes through Triton's own JIT path under a stand-in driver for each card, exactly as launched.
Fails on:
  - a compile error, or Triton's own resource error at load time;
  - shared memory above the card's limit as launched (232,448 bytes H100/H200, 166,912 A100);
  - any spill (ptxas -v spill stores) in a kernel on 16-bit data, or more than FP32_SPILL_BUDGET bytes on fp32 data;
  - a 16-bit attention forward without tensor-core instructions (wgmma at sm_90, mma.sync at sm_80).
Prints one line per compiled kernel and target: warps, stages, shared memory, registers, stack frame, spill stores.

--prewarm (on a machine with a GPU, before its tests): compiles the same kernels into Triton's cache, for that card's
target only, over --workers processes, and checks nothing but compile errors.
Run as its own process, without TRITON_INTERPRET (kernels defined under the interpreter cannot be compiled).
"""

import argparse
import collections
import concurrent.futures
import importlib
import multiprocessing
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

OPERATOR_MODULES = ("aquila.kernels.triton.rms_norm", "aquila.kernels.triton.layer_norm",
                    "aquila.kernels.triton.rotary", "aquila.kernels.triton.cross_entropy",
                    "aquila.kernels.triton.attention", "aquila.kernels.triton.glu",
                    "aquila.kernels.triton.quantized_linear")
# Tensor-core instructions the attention forward must use on 16-bit inputs: Hopper's warp-group MMA, Ampere's mma.
EXPECTED_INSTRUCTIONS = {("_attention_forward_kernel", 90): "wgmma", ("_attention_forward_kernel", 80): "mma.sync"}
# Spill stores (bytes per thread) an fp32 kernel may have; 16-bit kernels may have none.
FP32_SPILL_BUDGET = 128
TARGETS = (80, 90)

# The CI set: per module, the launch_cases() arguments that keep the check within 5 minutes on 2 cores while covering
# every configuration the launchers choose for the models' shapes. Attention: each head-dim class in bf16 and fp32
# (causal, GQA), fp16 and non-causal at 128, a head dim <= 32 that is not a multiple of 16 with MQA, fp32 at 80; the
# window and softcap specialisations (LEFT, RIGHT, SOFTCAP) softcapped, with a causal sliding window at the head dims
# where registers are tightest (bf16 128 and 256, fp32 128) and a two-sided one (its right side of 1 specialised) at
# bf16 128, and softcapping alone (its own backward tiles) at 64 in bf16 and fp32.
# Rotary: each kind of positions, pair layout and direction in every dtype at 32x128, the odd shapes in bf16. RMSNorm
# and LayerNorm: every block size and warp count (one block and chunked) in every dtype. Cross-entropy and GLU: whole.
# Quantized linear: int8 and asymmetric int4 in bf16 at a decoding step's rows and two prefills' (the three 16-bit
# forward tiles, both backward tiles), the scale-per-element path in bf16, fp32 at an odd width. --all: everything.
CI_CASES = {
    "aquila.kernels.triton.attention": [
        dict(head_dims=(64, 128, 256), heads=((8, 2),), dtypes=("bfloat16", "float32"), maskings=("causal",),
             softcaps=(0.0,)),
        dict(head_dims=(128,), heads=((8, 2),), dtypes=("float16",), maskings=("full",), softcaps=(0.0,)),
        dict(head_dims=(24,), heads=((4, 1),), dtypes=("bfloat16",), maskings=("full",), softcaps=(0.0,)),
        dict(head_dims=(80,), heads=((4, 1),), dtypes=("float32",), maskings=("causal",), softcaps=(0.0,)),
        dict(head_dims=(128,), heads=((8, 2),), dtypes=("bfloat16",), maskings=("sliding", "window"),
             softcaps=(50.0,)),
        dict(head_dims=(256,), heads=((8, 2),), dtypes=("bfloat16",), maskings=("sliding",), softcaps=(50.0,)),
        dict(head_dims=(128,), heads=((8, 2),), dtypes=("float32",), maskings=("sliding",), softcaps=(50.0,)),
        dict(head_dims=(64,), heads=((8, 2),), dtypes=("bfloat16", "float32"), maskings=("full",), softcaps=(50.0,)),
    ],
    "aquila.kernels.triton.rotary": [
        dict(shapes=((32, 128),)),
        dict(shapes=((1, 2), (40, 80), (16, 256)), positions_kinds=(None, "int64"), dtypes=("bfloat16",)),
    ],
    "aquila.kernels.triton.rms_norm": [dict(widths=(1, 1000, 2048, 8192, 65536))],
    "aquila.kernels.triton.layer_norm": [dict(widths=(1, 1000, 2048, 8192, 65536))],
    "aquila.kernels.triton.cross_entropy": [dict()],
    "aquila.kernels.triton.glu": [dict()],
    "aquila.kernels.triton.quantized_linear": [
        dict(weights=((8, None, False), (4, 128, True)), rows=(1, 40, 100), shapes=((384, 96),),
             dtypes=("bfloat16",)),
        dict(weights=((4, 6, False),), rows=(40,), shapes=((384, 96),), dtypes=("bfloat16",)),
        dict(weights=((4, 32, False),), rows=(40,), shapes=((768, 37),), dtypes=("float32",)),
    ],
}


def _cases(module_name, everything):
    """[(module name, selection index, case index, name, thunk)] of one module."""
    import torch

    module = importlib.import_module(module_name)
    selections = [dict()] if everything else CI_CASES.get(module_name, [dict()])
    cases = []
    for selection_index, selection in enumerate(selections):
        selection = {k: tuple(getattr(torch, d) for d in v) if k == "dtypes" else v for k, v in selection.items()}
        for case_index, (name, thunk) in enumerate(module.launch_cases(**selection)):
            cases.append((module_name, selection_index, case_index, name, thunk))
    return cases


def _case_thunk(module_name, everything, selection_index, case_index):
    for _, s, c, name, thunk in _cases(module_name, everything):
        if (s, c) == (selection_index, case_index):
            return name, thunk
    raise KeyError((module_name, selection_index, case_index))


def record_launches(everything, module_names=OPERATOR_MODULES):
    """{key: (module, selection, case, case name, Launch)}: the distinct launches the cases make, nothing compiled."""
    from tests.kernels import launch_capture

    distinct = {}
    modules = [importlib.import_module(m) for m in module_names]
    for module_name in module_names:
        for m, s, c, name, thunk in _cases(module_name, everything):
            launches = []
            with launch_capture.recording(modules, launches):
                thunk()
            for launch in launches:
                distinct.setdefault(launch.key, (m, s, c, name, launch))
    return distinct


def compile_task(task):
    """Compiles the launches `keys` of one case for one target: [result dict] (a worker process)."""
    module_name, everything, selection_index, case_index, keys, capability, check = task
    if check:
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints ptxas -v's report as it compiles
    from tests.kernels import launch_capture

    name, thunk = _case_thunk(module_name, everything, selection_index, case_index)
    modules = [importlib.import_module(module_name)]
    launches, results = [], []
    started = time.perf_counter()
    with launch_capture.active_driver(capability), launch_capture.recording(
            modules, launches, compile=lambda key: key in keys):
        thunk()
    for launch in launches:
        if launch.key not in keys or (not launch.compiled and not launch.error):
            continue
        keys = keys - {launch.key}
        result = {"case": name, "kernel": launch.kernel_name, "capability": capability, "error": launch.error,
                  "options": {k: v for k, v in launch.options.items()}, "dtype": _data_dtype(launch.key),
                  "shared": None, "usage": None, "instruction_ok": True}
        if launch.compiled is not None:
            result["shared"] = launch.compiled.metadata.shared
            if check:
                result["usage"] = launch_capture.resource_usage(launch.compiled, capability, launch.ptxas_log)
                instruction = EXPECTED_INSTRUCTIONS.get((launch.kernel_name, capability))
                if instruction and result["dtype"] in ("torch.bfloat16", "torch.float16"):
                    result["instruction_ok"] = instruction in launch.compiled.asm["ptx"]
        results.append(result)
    if results:
        results[0]["seconds"] = time.perf_counter() - started
    return results


def _data_dtype(key):
    """The dtype of a launch's first tensor argument (the data: x, q, logits)."""
    for argument in key[1]:
        if argument[0] == "tensor":
            return argument[1]
    return None


def problems(result, spill_budget=FP32_SPILL_BUDGET):
    """What is wrong with one compiled kernel (empty: it passes)."""
    from tests.kernels.launch_capture import CARDS

    found = []
    if result["error"]:
        found.append(result["error"])
    limit = CARDS[result["capability"]][1]
    if result["shared"] is not None and result["shared"] > limit:
        found.append(f"TOO MUCH SHARED MEMORY (limit {limit})")
    if result["usage"]:
        spills = result["usage"][2]
        budget = spill_budget if result["dtype"] == "torch.float32" else 0
        if spills > budget:
            found.append(f"SPILLS {spills} BYTES (budget {budget})")
    if not result["instruction_ok"]:
        found.append("NO TENSOR-CORE INSTRUCTION IN THE PTX")
    return found


def report_line(result):
    options = result["options"]
    constexprs = {k: v for k, v in options.items() if k not in ("num_warps", "num_stages")}
    usage = result["usage"] or ("?", "?", "?", "?")
    return (f"{result['kernel']:<30} sm_{result['capability']} warps={options.get('num_warps', 4):<2} "
            f"stages={options.get('num_stages', '-'):<2} shared={result['shared']!s:<6} regs={usage[0]!s:<3} "
            f"stack={usage[1]!s:<5} spill={usage[2]!s:<5} {result['dtype'][6:] if result['dtype'] else ''} "
            f"{constexprs} [{result['case']}] {', '.join(problems(result)) or 'ok'}")


def run(everything=False, targets=TARGETS, workers=2, check=True, spill_budget=FP32_SPILL_BUDGET, verbose=True,
        module_names=OPERATOR_MODULES):
    """Records, compiles and checks; returns (results, failures)."""
    started = time.perf_counter()
    distinct = record_launches(everything, module_names)
    by_case = collections.defaultdict(set)
    for key, (m, s, c, _name, _launch) in distinct.items():
        by_case[(m, s, c)].add(key)
    # Attention first (the longest compiles), so the pool ends on short tasks.
    order = sorted(by_case, key=lambda case: (not case[0].endswith("attention"), case))
    tasks = [(m, everything, s, c, frozenset(by_case[(m, s, c)]), capability, check)
             for capability in targets for (m, s, c) in order]
    if verbose:
        print(f"{len(distinct)} distinct launches from the launchers' cases, x {len(targets)} targets: "
              f"{len(distinct) * len(targets)} compiles over {workers} workers", flush=True)
    results = []
    # Spawned, not forked: a fork after torch's CPU thread pools have run deadlocks the children.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        for task_results in pool.map(compile_task, tasks):
            results += task_results
            if verbose:
                for result in task_results:
                    print(report_line(result), flush=True)
    failures = [r for r in results if problems(r, spill_budget)] if check else [r for r in results if r["error"]]
    if verbose:
        print(f"{len(distinct)} distinct kernels x {len(targets)} targets compiled as launched "
              f"({len(results)} compiles) in {time.perf_counter() - started:.0f} s with {workers} workers; "
              f"{len(failures)} failed the checks", flush=True)
    return results, failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--all", action="store_true", help="every launch case, not the CI set")
    parser.add_argument("--targets", default=None, help="compute capabilities, e.g. 80,90 (default: both; with "
                        "--prewarm: this machine's GPU)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--prewarm", action="store_true", help="fill Triton's cache for this machine's GPU")
    parser.add_argument("--list", action="store_true", help="print the distinct launches and exit")
    parser.add_argument("--modules", default=",".join(OPERATOR_MODULES), help="the kernel modules (comma-separated)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("triton_compile_check: run without TRITON_INTERPRET=1")
    modules = tuple(args.modules.split(","))
    if args.list:
        for *_, name, launch in record_launches(args.all, modules).values():
            print(f"{launch.kernel_name:<30} grid={launch.grid} {launch.options} [{name}]")
        return
    if args.targets:
        targets = tuple(int(t) for t in args.targets.split(","))
    elif args.prewarm:  # from nvidia-smi: no need to initialise CUDA in this process
        capability = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                                    capture_output=True, text=True, check=True).stdout.split()[0]
        targets = (int(capability.replace(".", "")),)
    else:
        targets = TARGETS
    _, failures = run(args.all, targets, args.workers, check=not args.prewarm, module_names=modules)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
