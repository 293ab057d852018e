"""Compiles every Triton kernel configuration for sm_80 (A100) and sm_90 (H100/H200) without a GPU.

Run as its own process, without TRITON_INTERPRET (kernels defined under the interpreter cannot be compiled):
    python tests/kernels/triton_compile_check.py
Fails on a compile error, and on a kernel whose shared memory exceeds what the GPU can give one block.
Prints one line per compiled kernel and target with its shared memory.
"""

import importlib
import os
import sys

OPERATOR_MODULES = ("aquila.kernels.rms_norm", "aquila.kernels.rotary", "aquila.kernels.cross_entropy")

# (compute capability, shared memory one block may use, in bytes)
TARGETS = ((80, 166912), (90, 232448))


def main():
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("triton_compile_check: run without TRITON_INTERPRET=1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cases = []
    for module in OPERATOR_MODULES:  # by module path: aquila.kernels re-exports functions of the same names
        cases += importlib.import_module(module).triton_compile_cases()
    seen, failures = set(), []
    for kernel, signature, constexprs, num_warps in cases:
        key = (kernel.__name__, tuple(sorted(signature.items())), tuple(sorted(constexprs.items())), num_warps)
        if key in seen:
            continue
        seen.add(key)
        for capability, shared_limit in TARGETS:
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                      options={"num_warps": num_warps})
            shared = compiled.metadata.shared
            ptx = compiled.asm["ptx"]
            status = "ok" if shared <= shared_limit else f"TOO MUCH SHARED MEMORY (limit {shared_limit})"
            print(f"{kernel.__name__:<20} sm_{capability} warps={num_warps:<2} shared={shared:<6} "
                  f"ptx_lines={ptx.count(chr(10)):<6} {constexprs} {status}")
            if shared > shared_limit:
                failures.append((kernel.__name__, capability, constexprs))
    print(f"{len(seen)} configurations x {len(TARGETS)} targets compiled; {len(failures)} over the limit")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
