"""What weight-only quantization costs a model: held-out perplexity and agreement with the bf16 model's tokens.

    python scripts/quantization_quality.py runs/demo --out benchmarks/results/quantization-quality-demo.json

For the checkpoint (or a run directory: its latest checkpoint) loaded as fp32, bf16, int8 and int4 (symmetric and
asymmetric, for each --group-size that divides every block layer's input size; the output projection in int8, and for
int8 and symmetric int4 also kept in bf16), all computing in bf16 but the fp32 reference:
- perplexity on the held-out split, the one the trainer validates on (by default the demo corpus's valid.jsonl.gz,
  tokenized as the trainer does, [BOS] + ids + [EOS] per document), read once whole in packed samples of --seq-len
  tokens whose documents attend only to themselves, as in training;
- greedy agreement: each prompt continued greedily for --new-tokens tokens; the share of positions where the
  variant's token equals bf16's, and how many tokens come before the first difference;
- top-1 agreement per step: along bf16's greedy continuation (teacher-forced, so one difference does not carry over),
  the share of steps where the variant's most likely next token is bf16's;
- perplexity through the decoding step (the one-call C++ step that generation runs, aquila/model/native_decode.py),
  one token at a time over the first --step-documents held-out documents (each up to --seq-len tokens): for the
  quantized variants both with the projections' inputs rounded to int8 (int8_inputs) and with fp32 inputs, since
  that rounding is the step's alone (the perplexity above comes from the forward pass, whose inputs stay bf16).
The goals (int8 within +0.5% of bf16's perplexity, int4 g128 within +5%) are checked and recorded with the numbers.
"""

import argparse
import json
import math
import os
import platform
import sys
import tempfile
from typing import Optional

import torch

from aquila import IGNORE_INDEX
from aquila.data import demo_file
from aquila.data.indexed import IndexedDataset
from aquila.data.packing import PackedDataset, collate
from aquila.data.tokenizer import Tokenizer
from aquila.kernels import backend as _backend
from aquila.model import native_decode
from aquila.model.checkpoint import load
from aquila.model.generate import Sampling, generate
from aquila.model.model import KVCache
from aquila.model.quantize import Quantization, linears_to_quantize
from aquila.train.checkpoint import resolve
from aquila.train.data import tokenized_corpus

PROMPTS = ["床前明月光，", "白日依山尽，", "The history of the city", "In mathematics, a prime number",
           "def fibonacci(n):\n", "import numpy as np\n"]
# The report's keys of the decoding step's perplexity, by int8_inputs.
STEP_PERPLEXITY = {False: "decoding_step_perplexity", True: "decoding_step_perplexity, int8 inputs"}
GOALS = {"int8": 0.5, "int4 g128 sym": 5.0, "int4 g128 asym": 5.0}  # % of bf16's perplexity


@torch.no_grad()
def perplexity(model, samples: PackedDataset, batch_size: int) -> dict:
    total, count = 0.0, 0
    for first in range(0, len(samples), batch_size):
        batch = collate([samples[i] for i in range(first, min(first + batch_size, len(samples)))])
        summed = model(batch["tokens"], batch["targets"], positions=batch["positions"],
                       cu_seqlens=batch["cu_seqlens"], num_tokens=1.0)
        total += float(summed)
        count += int((batch["targets"] != IGNORE_INDEX).sum())
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}


@torch.no_grad()
def greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    return [generate(model, [prompt], Sampling(max_new_tokens=new_tokens))[0] for prompt in prompts]


@torch.no_grad()
def next_token_choices(model, prompt: list[int], continuation: list[int]) -> list[int]:
    """The model's most likely token after each prefix prompt + continuation[:i], i = 0 .. len - 1."""
    tokens = torch.tensor([prompt + continuation[:-1]])
    logits = model(tokens)[0, len(prompt) - 1:]
    return logits.float().argmax(-1).tolist()


@torch.no_grad()
def step_perplexity(model, documents: list[list[int]], int8_inputs: bool) -> Optional[dict]:
    """Perplexity of the documents' tokens as the decoding step predicts them, fed one token at a time; None where
    the C++ step does not take the model."""
    total, count = 0.0, 0
    for document in documents:
        cache = KVCache(model.config, 1, len(document), dtype=model.tok_embeddings.weight.dtype)
        step = native_decode.decoder(model, cache, int8_inputs=int8_inputs)
        if step is None:
            return None
        for token, target in zip(document[:-1], document[1:]):
            logits = step(torch.tensor([[token]]))[0, 0]
            total -= float(logits.log_softmax(-1)[target])
            count += 1
    return {"loss": total / count, "perplexity": math.exp(total / count), "tokens": count}


def agreement(reference: list[list[int]], tokens: list[list[int]]) -> dict:
    same = [sum(a == b for a, b in zip(r, t)) for r, t in zip(reference, tokens)]
    before_first_difference = [next((i for i, (a, b) in enumerate(zip(r, t)) if a != b), len(r))
                               for r, t in zip(reference, tokens)]
    return {"share": sum(same) / sum(len(r) for r in reference), "per_prompt": [s / len(r) for s, r in
                                                                                 zip(same, reference)],
            "tokens_before_first_difference": before_first_difference}


def variants(model_dims, group_sizes) -> tuple[dict, dict]:
    """{name: (dtype, Quantization or None)} to measure, and {name: why not} for the group sizes a layer refuses. The
    quantized variants hold the output projection in int8 (the default); the symmetric ones are measured again with
    it kept in bf16 ("..., output bf16"), to show what quantizing it costs."""
    chosen = {"bf16": (torch.bfloat16, None), "fp32": (torch.float32, None), "int8": (torch.bfloat16, Quantization(8)),
              "int8, output bf16": (torch.bfloat16, Quantization(8, output_bits=None))}
    skipped = {}
    for group_size in group_sizes:
        misfit = next(((name, size) for name, size in model_dims if size % group_size), None)
        for symmetric, output_bits in ((True, 8), (True, None), (False, 8)):
            name = f"int4 g{group_size} {'sym' if symmetric else 'asym'}{'' if output_bits else ', output bf16'}"
            if misfit is None:
                chosen[name] = (torch.bfloat16, Quantization(4, group_size, symmetric, output_bits))
            else:
                skipped[name] = (f"layer {misfit[0]} has {misfit[1]} input features, not a multiple of {group_size}")
    return chosen, skipped


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's)")
    parser.add_argument("--corpus", default=demo_file("valid.jsonl.gz"),
                        help="held-out jsonl(.gz) corpus (default: the demo corpus's validation split)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per packed sample (the demo run's)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--samples", type=int, help="packed samples to evaluate (default: the whole split, once)")
    parser.add_argument("--group-size", type=int, nargs="+", default=[128, 64, 32], help="int4 group sizes to measure")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--step-documents", type=int, default=16,
                        help="held-out documents for the decoding step's perplexity (0: not measured)")
    parser.add_argument("--out", help="JSON results file (default: print only)")
    args = parser.parse_args(argv)
    if args.step_documents < 0:
        parser.error(f"--step-documents must be >= 0, got {args.step_documents}")

    checkpoint = resolve(args.checkpoint)
    tokenizer = Tokenizer.load(args.tokenizer or checkpoint)
    with tempfile.TemporaryDirectory() as cache:
        prefix = tokenized_corpus(args.corpus, tokenizer, cache, show_progress=False)
        indexed = IndexedDataset(prefix)
        tokens = int(indexed.sizes.sum())
        # One pass over the split: every token but the first is a target once.
        samples = PackedDataset(indexed, args.seq_len, args.samples or (tokens - 1) // args.seq_len, seed=0)
        prompts = [tokenizer.encode(text, bos=True) for text in PROMPTS]
        documents = [indexed[i][:args.seq_len].tolist() for i in range(min(args.step_documents, len(indexed)))]

        dense = load(checkpoint)
        dims = [(name, layer.in_features) for name, layer in linears_to_quantize(dense, quantize_output=False)]
        config = dense.config
        del dense
        chosen, skipped = variants(dims, args.group_size)
        results, reference_tokens = {}, None
        for name, (dtype, spec) in chosen.items():
            print(f"{name} ...", file=sys.stderr, flush=True)
            model = load(checkpoint, dtype=dtype, quantize=spec).eval()
            weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
            result = {"dtype": str(dtype).removeprefix("torch."), "weight_bytes": weight_bytes,
                      **perplexity(model, samples, args.batch_size)}
            continuations = greedy(model, prompts, args.new_tokens)
            if name == "bf16":
                reference_tokens = continuations
            elif reference_tokens is not None:
                result["greedy_agreement_vs_bf16"] = agreement(reference_tokens, continuations)
                choices = [next_token_choices(model, p, c) for p, c in zip(prompts, reference_tokens)]
                result["top1_agreement_per_step_vs_bf16"] = agreement(reference_tokens, choices)
            for int8_inputs in ((True, False) if spec is not None else (False,)):
                measured = step_perplexity(model, documents, int8_inputs) if documents else None
                if measured is not None:
                    result[STEP_PERPLEXITY[int8_inputs]] = measured
            result["continuations"] = [tokenizer.decode(c) for c in continuations]
            results[name] = result
            del model
    bf16 = results["bf16"]["perplexity"]
    bf16_step = results["bf16"].get(STEP_PERPLEXITY[False])
    for result in results.values():
        result["perplexity_change_vs_bf16_percent"] = 100 * (result["perplexity"] / bf16 - 1)
        for key in STEP_PERPLEXITY.values():
            if key in result:
                result[key]["change_vs_bf16_percent"] = 100 * (result[key]["perplexity"] / bf16_step["perplexity"] - 1)
    goals = {}
    for name, limit in GOALS.items():
        if name in results:
            change = results[name]["perplexity_change_vs_bf16_percent"]
            goals[name] = {"limit_percent": limit, "change_percent": change, "met": change <= limit}
        else:
            goals[name] = {"limit_percent": limit, "met": None, "not_measured": skipped.get(name, "not requested")}
    report = {
        "what": "weight-only quantization quality: held-out perplexity and agreement with the bf16 model",
        "checkpoint": os.path.relpath(checkpoint), "corpus": os.path.relpath(args.corpus),
        "model": {"parameters": config.num_parameters(), "dim": config.dim, "n_layers": config.n_layers,
                  "hidden_dim": config.hidden_dim, "vocab_size": config.vocab_size},
        "seq_len": args.seq_len, "prompts": PROMPTS, "new_tokens": args.new_tokens,
        "compute": "bf16 activations for every variant but fp32 (weights dequantized to bf16 per matmul), CPU",
        "step_documents": len(documents),
        "cpu_isa": _backend.cpu_extension.cpu_isa() if _backend.cpu_extension else None,
        "decoding_step": "fp32 activations; bf16 projections' inputs rounded to bf16 where the ISA is avx512_bf16 "
                         "(bf16_inputs); quantized ones' as each entry says",
        "torch": torch.__version__, "python": platform.python_version(),
        "goals": goals, "not_measured": skipped, "variants": results,
    }
    text = json.dumps(report, indent=1, ensure_ascii=False)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    for name, result in results.items():
        agree = result.get("top1_agreement_per_step_vs_bf16", {}).get("share")
        greedy_share = result.get("greedy_agreement_vs_bf16", {}).get("share")
        print(f"{name:>26}: perplexity {result['perplexity']:.3f} ({result['perplexity_change_vs_bf16_percent']:+.2f}% "
              f"vs bf16), {result['weight_bytes'] / 2**20:.2f} MiB"
              + (f", greedy {greedy_share:.1%}, top-1 per step {agree:.1%}" if agree is not None else ""))
        for key in STEP_PERPLEXITY.values():
            if key in result:
                print(f"{'':>26}  {key}: {result[key]['perplexity']:.3f} "
                      f"({result[key]['change_vs_bf16_percent']:+.2f}% vs bf16's step)")
    for name, why in skipped.items():
        print(f"{name:>26}: not measured ({why})")


if __name__ == "__main__":
    main()
