"""The whole training step, side by side: Aquila (fused kernels, FSDP2 ZeRO-2) against transformers'
LlamaForCausalLM (eager attention, eager loss) under DeepSpeed ZeRO-2, the stack FlagAI's users would otherwise run,
against the same transformers model with SDPA under torch.compile and DDP (Aquila under DDP too: on CPU, gloo's
collectives make FSDP's per-block gathers and reduce-scatters cost more than DDP's one overlapped all-reduce; on GPU
FSDP is the engine to use), and against Megatron-core's GPTModel, the original Aquila's own stack, under its DDP with
its distributed optimizer and with its plain one (benchmarks/megatron_step.py). Same model shape and parameter count,
global batch, sequence length, number of processes, optimizer (fused AdamW, clipping at 1.0) and precision; each
contender runs in its own torchrun launch of benchmarks/training_step.py, and each must start from a loss near
ln(vocab).

Precision (the `dtype` fixture, as the kernel benchmarks): on CPU every contender runs in fp32 and in bf16, on GPU in
bf16. In bf16 each trains the way its own stack does mixed precision (benchmarks/training_step.py says how: fp32
master weights for all; Aquila and torch.compile under autocast, DeepSpeed and Megatron with bf16 parameters). The op
label ends with the precision, so each contender's ratio is to DeepSpeed in the same precision.

On CPU: 2 processes over gloo with one thread each (the machine's 2 cores), a 45M-parameter model (dim 512, 4 layers,
8 heads, SwiGLU 1376, vocab 32000), 2 x 512 tokens per process. On GPU: one process, dim 1024, 8 layers, 8 x 2048
tokens. The summary shows seconds per step, model FLOP/s with the fraction of the measured matmul rate of the
precision (MFU against what this machine's matmul reaches), the ratio to DeepSpeed and the largest peak memory of any
process (resident set on CPU, allocator peak on GPU, MB). --quick: a tiny model, two steps, to keep the benchmark
working.
"""

import importlib.metadata
import json
import math
import os
import subprocess
import sys

import pytest

from aquila.model.config import AquilaConfig
from aquila.train.metrics import flops_per_token

HERE = os.path.dirname(os.path.abspath(__file__))
IMPLS = {"transformers + deepspeed zero-2": ("deepspeed", "zero2"),
         "transformers sdpa + torch.compile, ddp": ("compile", "ddp"),
         "megatron-core distributed optimizer": ("megatron", "distopt"), "megatron-core ddp": ("megatron", "ddp"),
         "aquila fsdp2 zero-2": ("aquila", "fsdp"), "aquila ddp": ("aquila", "ddp")}


def sizes(quick, device):
    if quick:
        return dict(dim=64, layers=2, heads=4, ffn=176, vocab=1000, batch=2, seq=64, warmup=1, steps=2)
    if device == "cuda":
        return dict(dim=1024, layers=8, heads=8, ffn=2816, vocab=32000, batch=8, seq=2048, warmup=3, steps=10)
    return dict(dim=512, layers=4, heads=8, ffn=1376, vocab=32000, batch=2, seq=512, warmup=2, steps=5)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_training_step(benchmark, record, device, quick, dtype, dtype_name, impl):
    contender, engine = IMPLS[impl]
    if contender == "deepspeed":
        pytest.importorskip("deepspeed", reason="DeepSpeed is a benchmark extra: DS_BUILD_OPS=0 pip install "
                                                "--no-build-isolation deepspeed")
    if contender == "megatron":
        try:  # asked of its metadata, not imported: no side effects in this process
            importlib.metadata.version("megatron-core")
        except importlib.metadata.PackageNotFoundError:
            pytest.skip("Megatron-core is a benchmark extra: pip install megatron-core==0.16.1")
    else:
        pytest.importorskip("transformers")
    shape = sizes(quick, device)
    processes = 1 if device == "cuda" else 2
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               os.path.join(HERE, "training_step.py"), "--impl", contender, "--engine", engine,
               "--precision", dtype_name,
               *[item for name, value in shape.items() for item in (f"--{name}", str(value))]]
    env = {**os.environ, "DS_ACCELERATOR": "cuda" if device == "cuda" else "cpu",
           "PYTHONPATH": os.path.dirname(HERE)}
    if device == "cpu":
        env.update(OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // processes)), TORCHINDUCTOR_COMPILE_THREADS="1")
    outcome = {}

    def launch():
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, result.stderr[-4000:]
        outcome.update(json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{"))))

    benchmark.pedantic(launch, rounds=1, iterations=1)
    config = AquilaConfig(dim=shape["dim"], n_layers=shape["layers"], n_heads=shape["heads"], ffn_dim=shape["ffn"],
                          vocab_size=shape["vocab"])
    flops = flops_per_token(config, shape["seq"]) * shape["batch"] * processes * shape["seq"]
    params = config.num_parameters()
    assert outcome["precision"] == dtype_name, outcome
    assert outcome["parameters"] == params, f"{impl}: {outcome['parameters']} parameters, Aquila's shape has {params}"
    assert outcome["losses"][0] == pytest.approx(math.log(shape["vocab"]), rel=0.05), outcome["losses"]
    record(f"training step {processes}x{shape['batch']}x{shape['seq']}, {params / 1e6:.0f}M params, {processes} proc, "
           f"{dtype_name}", impl, outcome["seconds_per_step"], flops=flops, dtype=dtype,
           tokens_per_s=outcome["tokens_per_s"], peak_memory_bytes=outcome["peak_memory_bytes"],
           losses=outcome["losses"], parameter_dtypes=outcome["parameter_dtypes"])
