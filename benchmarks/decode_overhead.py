"""The decoding step alone, and what generation spends outside it: aquila-100m (random weights), greedy, batch 1, a
16-token prompt and 32 new tokens, in fp32 and bf16, over several runs.

For each run it reports the median step's time and its weight reads as a fraction of the read bandwidth (measured
here, as the benchmarks do: a sum over a written 256 MiB tensor), and the share of the generation loop spent
outside the steps: (end to end - prefill - the steps) / (end to end - prefill), the sampling loop's own cost.

    python benchmarks/decode_overhead.py [--runs 3]
"""

import argparse
import statistics
import time

import torch

from aquila.model.config import AquilaConfig
from aquila.model.generate import Sampling, generate
from aquila.model.model import Aquila, KVCache

PROMPT, NEW_TOKENS = 16, 32


def read_bandwidth():
    src = torch.randn(64 * 2**20)
    src.sum()
    best = min(_seconds(src.sum) for _ in range(15))
    return src.numel() * src.element_size() / best


def _seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def one_run(model, prompt):
    """(end-to-end seconds, prefill seconds, the steps' seconds) of one greedy generation."""
    sampling = Sampling(max_new_tokens=NEW_TOKENS)
    total = _seconds(lambda: generate(model, [prompt], sampling))
    cache = KVCache(model.config, 1, PROMPT + NEW_TOKENS, dtype=model.tok_embeddings.weight.dtype)
    ids = torch.tensor([prompt])
    prefill = _seconds(lambda: model.forward_with_cache(ids, cache, last_only=True))
    step = model.decoder(cache)
    token = torch.zeros(1, 1, dtype=torch.long)
    steps = [_seconds(lambda: step(token)) for _ in range(NEW_TOKENS - 1)]  # generation runs max_new_tokens - 1
    return total, prefill, steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    prompt = torch.randint(0, 100008, (PROMPT,)).tolist()
    for dtype in (torch.float32, torch.bfloat16):
        model = Aquila(AquilaConfig.preset("aquila-100m")).to(dtype).eval()
        weight_bytes = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                           if name != "tok_embeddings.weight")  # a step reads one embedding row, every other weight
        with torch.no_grad():
            one_run(model, prompt)  # warm-up: the decoder's prefetch tuning, first-touch of the cache
            for run in range(args.runs):
                bandwidth = read_bandwidth()
                total, prefill, steps = one_run(model, prompt)
                step = statistics.median(steps)
                outside = (total - prefill - sum(steps)) / (total - prefill)
                print(f"{str(dtype)[6:]:8} run {run + 1}: step {step * 1e3:.2f} ms, {weight_bytes / step / 1e9:.1f} "
                      f"GB/s = {weight_bytes / step / bandwidth:.0%} of the read bandwidth ({bandwidth / 1e9:.1f} "
                      f"GB/s); outside the steps {outside:.1%} of the generation loop (end to end {total * 1e3:.0f} "
                      f"ms, prefill {prefill * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
