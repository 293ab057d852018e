"""Records what the Triton launchers launch, and compiles it as a launch would, on a machine without a GPU.

A stand-in Triton driver (`StandInDriver`) reports a card's compute capability and limits and records each launch
instead of running it: a real launcher call (aquila/kernels/triton/*.py) then goes through Triton's own JIT path, with
the launch-time specialisation (16-byte aligned pointers, integers equal to 1 or divisible by 16), the compile, and
Triton's own shared-memory check against the card's limit, exactly as on the card.

Inside `recording(modules, launches)` a launcher's kernels are recorders: a launcher call appends the launches it
would make (kernel, grid, options, a specialisation key) without compiling anything. With `compile=True` (or a
predicate on the key) each launch also goes to the real kernel, under `active_driver(capability)`, and the compiled
kernel (or the error) is kept in the record, with the grid the stand-in launcher received.

Works with Triton 3.6 to 3.9: only the driver interface (`triton.runtime.driver.set_active`, `get_current_target`,
`get_current_device`, `get_current_stream`, `utils.get_device_properties`, `utils.load_binary`, `launcher_cls`) and
`JITFunction.__getitem__` are used.
"""

import contextlib
import dataclasses
import io
import os
import re
import subprocess
import sys
import tempfile

import torch

# (compute capability, shared memory one block may use in bytes, multiprocessors) of the cards the kernels run on.
CARDS = {80: ("A100", 166912, 108), 90: ("H100/H200", 232448, 132)}


@dataclasses.dataclass
class Launch:
    """One launch a launcher makes: its kernel, grid and launch options, and the arguments' specialisation."""

    kernel_name: str
    grid: tuple
    options: dict  # the keyword arguments (constexprs, num_warps, num_stages)
    key: tuple  # what Triton specialises on: argument dtypes, 16-byte alignment, ints equal to 1 / divisible by 16
    compiled: object = None  # the CompiledKernel (compile=True)
    error: str = ""  # the compile or resource error (compile=True)
    ptxas_log: str = ""  # ptxas -v's report, when Triton printed it during the compile
    launched_grid: tuple = ()  # the grid the stand-in launcher received


def _argument_key(value):
    """Triton's launch-time specialisation of one argument (pointer alignment, int == 1 / % 16, dtype)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", value == 1, value % 16 == 0, -2**31 <= value < 2**31)
    if isinstance(value, float):
        return ("float",)
    return (type(value).__name__, repr(value))


class _Recorder:
    """Stands in for a @triton.jit kernel in its module: kernel[grid](*args, **kwargs) records the launch, and, when
    compiling, forwards it to the real kernel (under the stand-in driver) and keeps what Triton compiled."""

    def __init__(self, kernel, launches, compile):
        self.kernel, self.launches, self.compile = kernel, launches, compile

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            # Keyword arguments are constexprs and launch options: specialised on their values.
            key = (self.kernel.__name__, tuple(_argument_key(a) for a in args),
                   tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
            record = Launch(self.kernel.__name__, tuple(grid), dict(kwargs), key)
            self.launches.append(record)
            if self.compile is True or (self.compile and self.compile(key)):
                log = io.StringIO()
                try:
                    with contextlib.redirect_stdout(log):
                        record.compiled = self.kernel[grid](*args, **kwargs)
                except Exception as error:  # a compile error or Triton's OutOfResources: reported, not raised
                    record.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
                record.ptxas_log = log.getvalue()
                if _LAST_GRID:
                    record.launched_grid = _LAST_GRID.pop()
        return launch


_LAST_GRID = []


class _RecordingLauncher:
    """The stand-in for Triton's CUDA launcher: keeps the grid instead of launching."""

    def __init__(self, src, metadata):
        self.metadata = metadata

    def __call__(self, grid_x, grid_y, grid_z, *rest):
        _LAST_GRID.append((grid_x, grid_y, grid_z))


class _StandInUtils:
    def __init__(self, capability):
        self.capability = capability

    def get_device_properties(self, device):
        _, shared, multiprocessors = CARDS[self.capability]
        return {"max_shared_mem": shared, "multiprocessor_count": multiprocessors, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1_980_000, "mem_clock_rate": 2_619_000, "mem_bus_width": 5120}

    def load_binary(self, name, kernel, shared, device):
        # (module, function, registers, spills, max threads per block): nothing is loaded (no module to unload later,
        # when the stand-in driver is gone); registers and spills are read from ptxas -v instead.
        return None, None, 0, 0, 1024

    def unload_module(self, module):
        pass

    def get_device_capability(self, device):
        return divmod(self.capability, 10)


def stand_in_driver(capability):
    """A Triton driver for a card of this compute capability (80 or 90) that compiles for it and launches nothing."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class StandInDriver(DriverBase):
        def __init__(self):
            self.utils = _StandInUtils(capability)
            self.launcher_cls = _RecordingLauncher

        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return GPUTarget("cuda", capability, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_device_capability(self, device=None):
            return divmod(capability, 10)

        def get_benchmarker(self):
            raise RuntimeError("the stand-in driver launches nothing")

    return StandInDriver()


@contextlib.contextmanager
def active_driver(capability):
    """The stand-in driver active for this card, with the kernels' per-device caches emptied before and after (they
    hold the target they were first used with)."""
    import triton

    triton.runtime.driver.set_active(stand_in_driver(capability))
    try:
        yield
    finally:
        triton.runtime.driver.set_active(None)  # lazily back to the default driver on next use


def _kernels(module):
    """The @triton.jit kernels a module launches (named *_kernel; helpers are left alone, kernels inline them)."""
    import triton

    return {name: obj for name, obj in vars(module).items()
            if name.endswith("_kernel") and isinstance(obj, triton.runtime.JITFunction)}


@contextlib.contextmanager
def recording(modules, launches, compile=False):
    """Replaces the kernels of `modules` by recorders appending to `launches` while inside; `compile` (True, or a
    predicate on a launch's key) forwards launches to the real kernels (under a driver: see active_driver)."""
    saved = []
    for module in modules:
        for name, kernel in _kernels(module).items():
            if compile and hasattr(kernel, "device_caches"):
                kernel.device_caches.clear()  # the binder caches the target of the driver that first used it
            saved.append((module, name, kernel))
            setattr(module, name, _Recorder(kernel, launches, compile))
    try:
        yield
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)


# --- ptxas -v: registers, stack frame and spills of a compiled kernel ------------------------------------------------

_USED = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log):
    """(registers, stack frame, spill stores, spill loads) from a ptxas -v report of one kernel, or None."""
    used, frame = _USED.search(log), _FRAME.search(log)
    if not used or not frame:
        return None
    return int(used.group(1)), *(int(g) for g in frame.groups())


def ptxas_path(capability):
    """Triton's bundled ptxas (the one that compiled the kernel)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            return get_ptxas(capability).path
        except TypeError:  # Triton versions where get_ptxas takes no architecture
            return get_ptxas().path
    except ImportError:
        from triton import knobs
        return knobs.nvidia.ptxas.path


def resource_usage(compiled, capability, log=""):
    """(registers, stack frame, spill stores, spill loads) of a compiled kernel: from the report Triton printed while
    compiling it, else (a kernel from Triton's cache) by running ptxas -v on its PTX."""
    usage = parse_ptxas(log)
    if usage:
        return usage
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as directory:
        ptx = os.path.join(directory, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        result = subprocess.run([ptxas_path(capability), "-v", f"--gpu-name={arch}", ptx, "-o",
                                 os.path.join(directory, "kernel.cubin")], capture_output=True, text=True)
    usage = parse_ptxas(result.stderr + result.stdout)
    if usage is None:
        print(result.stderr, file=sys.stderr)
        raise RuntimeError("ptxas -v printed no resource usage")
    return usage
