"""Compiles every Triton kernel configuration for sm_80 (A100) and sm_90 (H100/H200) without a GPU.

Run as its own process, without TRITON_INTERPRET (kernels defined under the interpreter cannot be compiled):
    python tests/kernels/triton_compile_check.py
Fails on a compile error, and on a kernel whose shared memory exceeds what the GPU can give one block.
Prints one line per compiled kernel and target with its shared memory.
"""

import concurrent.futures
import importlib
import os
import sys

OPERATOR_MODULES = ("aquila.kernels.triton.rms_norm", "aquila.kernels.triton.rotary",
                    "aquila.kernels.triton.cross_entropy", "aquila.kernels.triton.attention")
# Tensor-core instructions the attention forward must use on 16-bit inputs: Hopper's warp-group MMA, Ampere's mma.
EXPECTED_INSTRUCTIONS = {("_attention_forward_kernel", 90): "wgmma", ("_attention_forward_kernel", 80): "mma.sync"}

# (compute capability, shared memory one block may use, in bytes)
TARGETS = ((80, 166912), (90, 232448))


def compile_case(task):
    """Compiles case `index` of `module` for one target: (report line, list of problems)."""
    module, index, capability, shared_limit = task
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, signature, constexprs, num_warps, *stages = importlib.import_module(module).compile_cases()[index]
    num_stages = stages[0] if stages else 3
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    shared = compiled.metadata.shared
    ptx = compiled.asm["ptx"]
    problems = []
    if shared > shared_limit:
        problems.append(f"TOO MUCH SHARED MEMORY (limit {shared_limit})")
    instruction = EXPECTED_INSTRUCTIONS.get((kernel.__name__, capability))
    sixteen_bit = any(v in ("*bf16", "*fp16") for v in signature.values())
    if instruction and sixteen_bit and instruction not in ptx:
        problems.append(f"NO {instruction} IN THE PTX")
    line = (f"{kernel.__name__:<30} sm_{capability} warps={num_warps:<2} stages={num_stages} shared={shared:<6} "
            f"{signature[next(iter(signature))]:<6} {constexprs} {', '.join(problems) or 'ok'}")
    return line, problems


def main():
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("triton_compile_check: run without TRITON_INTERPRET=1")
    tasks, seen = [], set()
    for module in OPERATOR_MODULES:
        for index, (kernel, signature, constexprs, *launch) in enumerate(
                importlib.import_module(module).compile_cases()):
            key = (kernel.__name__, tuple(sorted(signature.items())), tuple(sorted(constexprs.items())), *launch)
            if key not in seen:
                seen.add(key)
                tasks += [(module, index, capability, limit) for capability, limit in TARGETS]
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        results = list(pool.map(compile_case, tasks))
    failures = 0
    for line, problems in results:
        print(line)
        failures += bool(problems)
    print(f"{len(seen)} configurations x {len(TARGETS)} targets compiled; {failures} failed the checks")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
