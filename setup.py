"""Builds Aquila's native kernels with ninja, without torch.

* ``aquila._C``: the CPU kernels (C++17, OpenMP), always built.
* ``aquila._cuda``: the CUDA kernels, built with nvcc for sm_80 and sm_90a (plus compute_90 PTX) whenever nvcc is
  found; ``AQUILA_CUDA=0`` skips it, ``AQUILA_CUDA=1`` makes a missing nvcc an error.

Both modules see only raw pointers, sizes and strides from Python, so neither includes a torch header: a build takes
seconds, needs no particular torch, and cannot mismatch the torch it runs with.
"""

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CUDA_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_90,code=compute_90",  # PTX, so newer GPUs can JIT the kernels
]


def fail(message):
    sys.exit(f"\naquila: {message}\n")


class NativeExtension(Extension):
    def __init__(self, name, sources, cuda=False):
        super().__init__(name, sources)
        self.cuda = cuda


def find_cuda():
    """The (nvcc, CUDA root) to build with, or None when the CUDA extension should be skipped."""
    wanted = os.environ.get("AQUILA_CUDA", "").strip()
    if wanted == "0":
        return None
    roots = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")] + ["/usr/local/cuda"]
    for root in filter(None, roots):
        nvcc = os.path.join(root, "bin", "nvcc")
        if os.path.exists(nvcc):
            return nvcc, root
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc, os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if wanted == "1":
        fail("AQUILA_CUDA=1 but nvcc was not found: set CUDA_HOME to the CUDA toolkit (it must contain bin/nvcc).")
    print("aquila: nvcc not found, building without the CUDA kernels (Triton and CPU kernels still work).")
    return None


def ninja_path():
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja

        return os.path.join(ninja.BIN_DIR, "ninja")
    except ImportError:
        fail("ninja is needed to build the kernels: pip install ninja")


class NinjaBuildExt(build_ext):
    """Compiles each extension with a generated build.ninja: parallel, incremental, and with readable commands."""

    def build_extension(self, ext):
        import pybind11

        cxx = os.environ.get("CXX", "c++")
        if not shutil.which(cxx):
            fail(f"no C++ compiler found (looked for '{cxx}'): install g++ (Debian/Ubuntu: apt-get install g++) "
                 "or set CXX to one.")
        root = os.path.dirname(os.path.abspath(__file__))
        build_dir = os.path.abspath(os.path.join(self.build_temp, ext.name))
        os.makedirs(build_dir, exist_ok=True)
        output = os.path.abspath(self.get_ext_fullpath(ext.name))
        os.makedirs(os.path.dirname(output), exist_ok=True)

        includes = [os.path.join(root, "csrc"), pybind11.get_include(), sysconfig.get_paths()["include"]]
        include_flags = " ".join(f"-I{shlex.quote(p)}" for p in includes)
        cxxflags = f"-O3 -std=c++17 -fPIC -fvisibility=hidden -Wall -Wno-unknown-pragmas {include_flags}"
        ldflags = "-shared"
        if not ext.cuda:
            # -fno-trapping-math: the kernels never read floating-point exception flags, and without it GCC keeps
            # every loop with a float ?: scalar (it will not speculate float arithmetic). Results are unchanged.
            cxxflags += " -fopenmp -fno-trapping-math"
            ldflags += " -fopenmp"

        lines = [
            f"cxx = {cxx}",
            f"cxxflags = {cxxflags}",
            "rule cxx",
            "  command = $cxx $cxxflags -MMD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = c++ $in",
        ]
        if ext.cuda:
            nvcc, cuda_root = self.cuda
            nvccflags = (f"-O3 -std=c++17 -Xcompiler -fPIC -Xcompiler -fvisibility=hidden --use_fast_math "
                         f"{' '.join(CUDA_ARCH_FLAGS)} {include_flags}")
            lines += [
                f"nvcc = {nvcc}",
                f"nvccflags = {nvccflags}",
                "rule nvcc",
                "  command = $nvcc $nvccflags -MD -MF $out.d -c $in -o $out",
                "  depfile = $out.d",
                "  deps = gcc",
                "  description = nvcc $in",
            ]
            ldflags += f" -L{shlex.quote(os.path.join(cuda_root, 'lib64'))} -lcudart_static -ldl -lrt -lpthread"
        objects = []
        for source in ext.sources:
            obj = os.path.join(build_dir, source.replace("/", "_") + ".o")
            rule = "nvcc" if source.endswith(".cu") else "cxx"
            lines.append(f"build {obj}: {rule} {os.path.join(root, source)}")
            objects.append(obj)
        lines += [
            "rule link",
            f"  command = $cxx $in -o $out {ldflags}",
            "  description = link $out",
            f"build {output}: link {' '.join(objects)}",
        ]
        with open(os.path.join(build_dir, "build.ninja"), "w") as f:
            f.write("\n".join(lines) + "\n")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        result = subprocess.run([ninja_path(), "-C", build_dir, "-j", jobs])
        if result.returncode != 0:
            fail(f"building {ext.name} failed (the compiler's messages are above).")

    def build_extensions(self):
        self.cuda = find_cuda()
        self.extensions = [e for e in self.extensions if not e.cuda or self.cuda]
        super().build_extensions()


def sources(folder, suffix):
    here = os.path.dirname(os.path.abspath(__file__))
    return sorted(f"{folder}/{f}" for f in os.listdir(os.path.join(here, folder)) if f.endswith(suffix))


setup(
    ext_modules=[
        NativeExtension("aquila._C", ["csrc/bind_cpu.cpp"] + sources("csrc/cpu", ".cpp")),
        NativeExtension("aquila._cuda", ["csrc/bind_cuda.cpp"] + sources("csrc/cuda", ".cu"), cuda=True),
    ],
    cmdclass={"build_ext": NinjaBuildExt},
)
