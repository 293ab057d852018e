"""Aquila against llama.cpp (through llama-cpp-python) and transformers on the CPU: the same weights, the same thread
count, one sequence, a fixed prompt and greedy generation. For each precision pair,

    Aquila bf16  vs llama.cpp BF16,   Aquila int8 (per channel)  vs Q8_0,   Aquila int4 (symmetric, g128)  vs Q4_0

(the quantized ones with the output projection in int8, Aquila's default, where a Q8_0 file holds it in Q8_0 and a
Q4_0 file in Q6_K; asked for by --precisions, int4-out4 is Aquila int4 with the output projection in int4 too, the
form whose decoding step reads closest to a quarter of bf16's bytes, against the same Q4_0 file), and transformers
in bf16, it reports prompt processing tokens/s (the prompt's forward pass), generation tokens/s (the decoding steps
that follow, each with its greedy pick), load seconds and peak resident memory. Every measurement runs in a fresh
process (so peak memory is that engine's alone and nothing is left cached in the process), in turns: one run is
every engine once, so that a load on the shared host that comes and goes hits each alike; the ratios are taken
within a run. Each process warms up first (a short prompt and a few steps: first-touch allocations, Aquila's
one-off decoding-step tuning) before the timed prompt and steps.

The GGUF files come from the checkpoint by llama.cpp's own converter, `convert_hf_to_gguf.py` with its bundled
gguf-py (from the llama-cpp-python 0.3.36 source distribution: the PyPI `gguf` package is too old for it), to BF16
and Q8_0; Q4_0 is quantized from the BF16 file by `llama_model_quantize` (llama.cpp's C API). The converter is run
unmodified, except that it is told the tokenizer's kind and pre-tokenizer (byte-level BPE with GPT-2's split, as
the bundled demo tokenizer is), which it would otherwise try to read as SentencePiece and refuse to guess for a
tokenizer it has no hash of. The token ids are the same in both engines (the prompt is ids, not text), and the
vocabulary is padded to the model's.

    python benchmarks/llamacpp.py --llama-cpp-source DIR (--preset aquila-100m | --checkpoint DIR) [--runs 3]

DIR is the unpacked source distribution's `vendor/llama.cpp` (docs/building.md says how to get it and how to
build llama-cpp-python). Results go to --out (JSON, and a Markdown table beside it), with the host, its ISA path, the
read bandwidth measured before each run and the bytes of weights each decoding step reads.
"""

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_TOKENIZER = os.path.join(REPO, "aquila", "data", "demo", "tokenizer")
# (Aquila's weights, llama.cpp's file type) per precision.
PAIRS = {"bf16": ("bf16", "BF16"), "int8": ("int8", "Q8_0"), "int4": ("int4", "Q4_0"),
         "int4-out4": ("int4, output int4", "Q4_0")}
INT4_GROUP = 128  # the default; --group-size for models whose widths it does not divide


def peak_rss_bytes():
    """This process's peak resident memory (VmHWM: unlike getrusage's maxrss, not inherited from the parent's
    memory at exec)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def seconds(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


# --- One engine in one process ---------------------------------------------------------------------------------------


def measure_aquila(checkpoint, precision, group_size, prompt, new_tokens, threads):
    import torch

    from aquila.model import checkpoint as checkpoints
    from aquila.model import native_decode
    from aquila.model.model import KVCache
    from aquila.model.quantize import Quantization

    torch.set_num_threads(threads)
    quantize = {"bf16": None, "int8": Quantization(bits=8),
                "int4": Quantization(bits=4, group_size=group_size),
                "int4-out4": Quantization(bits=4, group_size=group_size, output_bits=4)}[precision]
    load_seconds, model = seconds(lambda: checkpoints.load(checkpoint, dtype=torch.bfloat16, quantize=quantize))
    model.eval()

    def run(tokens, steps):
        cache = KVCache(model.config, 1, len(tokens) + steps, dtype=torch.bfloat16)
        with torch.no_grad():
            prompt_seconds, logits = seconds(
                lambda: model.forward_with_cache(torch.tensor([tokens]), cache, last_only=True))
            decode = model.decoder(cache)
            token = logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            for _ in range(steps):
                token = decode(token)[:, -1].argmax(-1, keepdim=True)
            return prompt_seconds, time.perf_counter() - start

    run(prompt[:8], 4)
    prompt_seconds, generate_seconds = run(prompt, new_tokens)
    native = native_decode.decoder(model, KVCache(model.config, 1, 1, dtype=torch.bfloat16))
    return {"load_s": load_seconds, "prompt_s": prompt_seconds, "generate_s": generate_seconds,
            "quantization": None if quantize is None else quantize.describe(),
            "decode_path": "modules" if native is None else "native C++ step",
            "bf16_inputs": None if native is None else native.bf16_inputs,
            "int8_inputs": None if native is None else native.int8_inputs,
            "weight_bytes_per_step": native_decode.weight_bytes_per_step(model)}


def measure_llamacpp(gguf, prompt, new_tokens, threads):
    import llama_cpp
    import numpy as np

    def load():
        return llama_cpp.Llama(model_path=gguf, n_ctx=len(prompt) + new_tokens + 8, n_batch=len(prompt),
                               n_threads=threads, n_threads_batch=threads, verbose=False)

    load_seconds, model = seconds(load)
    vocab = model.n_vocab()

    def greedy():
        """The last position's most likely token, read from llama.cpp's context (the bindings keep logits only when
        asked to compute them at every position, which would tax the prompt with a vocabulary projection per
        token, as Aquila's prompt pass does not)."""
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, -1), shape=(vocab,))))

    def run(tokens, steps):
        model.reset()
        prompt_seconds, _ = seconds(lambda: model.eval(tokens))
        token = greedy()
        start = time.perf_counter()
        for _ in range(steps):
            model.eval([token])
            token = greedy()
        return prompt_seconds, time.perf_counter() - start

    run(prompt[:8], 4)
    prompt_seconds, generate_seconds = run(prompt, new_tokens)
    return {"load_s": load_seconds, "prompt_s": prompt_seconds, "generate_s": generate_seconds}


def measure_transformers(checkpoint, prompt, new_tokens, threads):
    import torch
    import transformers

    torch.set_num_threads(threads)
    load_seconds, model = seconds(
        lambda: transformers.LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval())

    def run(tokens, steps):
        with torch.no_grad():
            prompt_seconds, out = seconds(lambda: model(torch.tensor([tokens]), use_cache=True))
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            for _ in range(steps):
                out = model(token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            return prompt_seconds, time.perf_counter() - start

    run(prompt[:8], 4)
    prompt_seconds, generate_seconds = run(prompt, new_tokens)
    return {"load_s": load_seconds, "prompt_s": prompt_seconds, "generate_s": generate_seconds}


def child(args):
    """Runs one measurement and prints it as JSON (the parent's subprocess)."""
    spec = json.loads(args.child)
    prompt = spec["prompt"]
    if spec["engine"] == "aquila":
        result = measure_aquila(spec["checkpoint"], spec["precision"], spec["group_size"], prompt, spec["new_tokens"],
                                spec["threads"])
    elif spec["engine"] == "llama.cpp":
        result = measure_llamacpp(spec["gguf"], prompt, spec["new_tokens"], spec["threads"])
    else:
        result = measure_transformers(spec["checkpoint"], prompt, spec["new_tokens"], spec["threads"])
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["prompt_tokens_per_s"] = len(prompt) / result["prompt_s"]
    result["generate_tokens_per_s"] = spec["new_tokens"] / result["generate_s"]
    print(json.dumps(result))


def run_child(spec):
    completed = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                               text=True, cwd=REPO)
    if completed.returncode != 0:
        raise RuntimeError(f"{spec['engine']} {spec.get('precision') or spec.get('gguf')} failed "
                           f"(exit {completed.returncode}):\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# --- The files -------------------------------------------------------------------------------------------------------


def convertible_directory(checkpoint, work):
    """The checkpoint's files beside a tokenizer, as the converter wants them: the checkpoint's own tokenizer if it
    has one, else the bundled demo tokenizer (links, nothing copied)."""
    staging = os.path.join(work, "hf")
    os.makedirs(staging, exist_ok=True)
    tokenizer = checkpoint if os.path.exists(os.path.join(checkpoint, "tokenizer.json")) else DEMO_TOKENIZER
    for directory in (checkpoint, tokenizer):
        for name in os.listdir(directory):
            link = os.path.join(staging, name)
            if not os.path.lexists(link):
                os.symlink(os.path.join(os.path.abspath(directory), name), link)
    return staging


CONVERT = """
import sys
sys.path.insert(0, {source!r})
sys.path.insert(0, {source!r} + "/gguf-py")
import convert_hf_to_gguf
from conversion import base, llama
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
llama.LlamaModel.set_vocab = lambda self: self._set_vocab_gpt2()
sys.argv = ["convert_hf_to_gguf.py"] + {argv!r}
convert_hf_to_gguf.main()
"""


def convert(source, staging, outtype, path):
    """Writes path with llama.cpp's converter, through a temporary name so that a failed run leaves nothing."""
    partial = path + ".partial"
    code = CONVERT.format(source=os.path.abspath(source), argv=[staging, "--outtype", outtype, "--outfile", partial])
    subprocess.run([sys.executable, "-c", code], check=True, cwd=source)
    os.replace(partial, path)


def quantize_q4_0(source_gguf, path, threads):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = threads
    partial = path + ".partial"
    if llama_cpp.llama_model_quantize(source_gguf.encode(), partial.encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {source_gguf}")
    os.replace(partial, path)


def gguf_files(source, checkpoint, work, threads, kinds):
    """{file type: path} for the file types in kinds, each made unless already in work (made by an earlier run of this
    script). A missing Q4_0 is quantized from the BF16 file, which is made for it if need be; a Q4_0 file already there
    needs no BF16 one (a 7B model's BF16 file is 14.5 GB of disk)."""
    paths = {kind: os.path.join(work, f"model-{kind}.gguf") for kind in ("BF16", "Q8_0", "Q4_0")}
    wanted = set(kinds) | ({"BF16"} if "Q4_0" in kinds and not os.path.exists(paths["Q4_0"]) else set())
    staging = None
    for kind, outtype in (("BF16", "bf16"), ("Q8_0", "q8_0")):
        if kind in wanted and not os.path.exists(paths[kind]):
            staging = staging or convertible_directory(checkpoint, work)
            convert(source, staging, outtype, paths[kind])
    if "Q4_0" in wanted and not os.path.exists(paths["Q4_0"]):
        quantize_q4_0(paths["BF16"], paths["Q4_0"], threads)
    return {kind: paths[kind] for kind in kinds}


# --- The parent ------------------------------------------------------------------------------------------------------


def summary_markdown(record):
    lines = [f"# Aquila vs llama.cpp vs transformers, {record['model']}, CPU", "",
             f"{record['host']['cpu_model']}, ISA path {record['host']['aquila_cpu_isa']}, {record['threads']} "
             f"threads; prompt {record['prompt_tokens']} tokens, {record['new_tokens']} generated, batch 1; "
             f"{record['runs']} runs (spread = min-max over runs). Read bandwidth measured before each run: "
             f"{min(record['read_bandwidth']) / 1e9:.1f}-{max(record['read_bandwidth']) / 1e9:.1f} GB/s.", "",
             "| engine | weights | load s | peak RSS GB | prompt tok/s | generation tok/s | generation vs llama.cpp |"
             " prompt vs llama.cpp | weights read, % of read bandwidth |",
             "|---|---|---|---|---|---|---|---|---|"]

    def spread(values, fmt="{:.1f}"):
        return fmt.format(min(values)) + ("" if len(values) == 1 else "-" + fmt.format(max(values)))

    for row in record["rows"]:
        runs = row["runs"]
        ratios = row.get("vs_llamacpp")
        bandwidth = row.get("bandwidth_fraction")
        lines.append(
            f"| {row['engine']} | {row['weights']} | {spread([r['load_s'] for r in runs])} | "
            f"{spread([r['peak_rss_bytes'] / 1e9 for r in runs], '{:.2f}')} | "
            f"{spread([r['prompt_tokens_per_s'] for r in runs])} | {spread([r['generate_tokens_per_s'] for r in runs])}"
            f" | {spread(ratios['generate'], '{:.2f}x') if ratios else ''}"
            f" | {spread(ratios['prompt'], '{:.2f}x') if ratios else ''}"
            f" | {spread([100 * f for f in bandwidth], '{:.0f}%') if bandwidth else ''} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--llama-cpp-source", help="the unpacked llama-cpp-python sdist's vendor/llama.cpp")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--checkpoint", help="a Hugging Face layout checkpoint (e.g. from `aquila random-checkpoint`)")
    what.add_argument("--preset", help="write a random bf16 checkpoint of this preset into --work")
    parser.add_argument("--work", help="where the GGUF files (and a --preset checkpoint) are made and kept "
                                       "(default: a temporary directory, removed afterwards)")
    parser.add_argument("--precisions", default="bf16,int8,int4")
    parser.add_argument("--no-transformers", action="store_true", help="leave transformers out (it needs another "
                                                                          "bf16 copy of the model in memory)")
    parser.add_argument("--group-size", type=int, default=INT4_GROUP, help="Aquila's int4 group size")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", help="JSON file for the results (a .md table is written beside it)")
    args = parser.parse_args()
    if args.child:
        return child(args)
    if not args.llama_cpp_source or not os.path.exists(os.path.join(args.llama_cpp_source, "convert_hf_to_gguf.py")):
        parser.error("--llama-cpp-source must be the llama.cpp source directory holding convert_hf_to_gguf.py "
                     "(vendor/llama.cpp of the llama-cpp-python sdist)")
    if not (args.checkpoint or args.preset):
        parser.error("give --checkpoint or --preset")
    precisions = args.precisions.split(",")
    unknown = [p for p in precisions if p not in PAIRS]
    if unknown:
        parser.error(f"--precisions: unknown {unknown}; choose from {list(PAIRS)}")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        parser.error("llama-cpp-python is not installed (docs/building.md says how)")
    if args.out and os.path.exists(args.out):
        parser.error(f"--out: {args.out} exists; choose a new name")

    import torch
    from decode_overhead import read_bandwidth  # this script's folder is on the path when it runs

    from aquila import host
    from aquila.kernels import backend
    from aquila.model.checkpoint import read_json, save_random_hf
    from aquila.model.config import AquilaConfig

    temporary = None if args.work else tempfile.mkdtemp(prefix="aquila-llamacpp-")
    work = args.work or temporary
    os.makedirs(work, exist_ok=True)
    try:
        checkpoint = args.checkpoint
        if args.preset:
            checkpoint = os.path.join(work, f"{args.preset}-bf16")
            if not os.path.exists(os.path.join(checkpoint, "config.json")):
                save_random_hf(AquilaConfig.preset(args.preset), checkpoint)
        files = gguf_files(args.llama_cpp_source, checkpoint, work, args.threads,
                           sorted({PAIRS[precision][1] for precision in precisions}))
        torch.manual_seed(0)
        vocab = read_json(os.path.join(checkpoint, "config.json"))["vocab_size"]
        prompt = torch.randint(0, vocab, (args.prompt_tokens,)).tolist()
        common = {"prompt": prompt, "new_tokens": args.new_tokens, "threads": args.threads}
        engines = []
        for precision in precisions:
            ours, theirs = PAIRS[precision]
            engines.append(("aquila", ours, {"engine": "aquila", "checkpoint": checkpoint, "precision": precision,
                                                "group_size": args.group_size}))
            if ("llama.cpp", theirs) not in [(engine, weights) for engine, weights, _ in engines]:  # once each file
                engines.append(("llama.cpp", theirs, {"engine": "llama.cpp", "gguf": files[theirs]}))
        if not args.no_transformers:
            engines.append(("transformers", "bf16", {"engine": "transformers", "checkpoint": checkpoint}))
        results = {(engine, weights): [] for engine, weights, _ in engines}
        bandwidths = []
        torch.set_num_threads(args.threads)
        for run in range(args.runs):
            bandwidths.append(read_bandwidth())
            for engine, weights, spec in engines:
                result = run_child({**common, **spec})
                results[engine, weights].append(result)
                print(f"run {run + 1}: {engine} {weights}: load {result['load_s']:.1f} s, prompt "
                      f"{result['prompt_tokens_per_s']:.1f} tok/s, generation {result['generate_tokens_per_s']:.2f} "
                      f"tok/s, peak RSS {result['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
        rows = []
        for engine, weights, spec in engines:
            row = {"engine": engine, "weights": weights, "runs": results[engine, weights]}
            if engine == "aquila":
                theirs = results["llama.cpp", PAIRS[spec["precision"]][1]]
                ours = results[engine, weights]
                row["vs_llamacpp"] = {
                    key: [o[f"{key}_tokens_per_s"] / t[f"{key}_tokens_per_s"] for o, t in zip(ours, theirs)]
                    for key in ("prompt", "generate")}
                row["bandwidth_fraction"] = [r["weight_bytes_per_step"] * r["generate_tokens_per_s"] / b
                                             for r, b in zip(ours, bandwidths)]
            rows.append(row)
        record = {"model": args.preset or os.path.basename(os.path.normpath(checkpoint)),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "host": {"cpu_model": host.cpu_model(), "cores": os.cpu_count(),
                           "aquila_cpu_isa": backend.cpu_extension.cpu_isa(),
                           "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
                  "threads": args.threads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                  "runs": args.runs, "read_bandwidth": bandwidths, "int4_group_size": args.group_size,
                  "llama_cpp_python": __import__("llama_cpp").__version__, "rows": rows,
                  "median_generation_ratio": {r["weights"]: statistics.median(r["vs_llamacpp"]["generate"])
                                              for r in rows if "vs_llamacpp" in r}}
        markdown = summary_markdown(record)
        print(markdown)
        if args.out:
            with open(args.out, "x") as handle:
                json.dump(record, handle, indent=1)
            with open(os.path.splitext(args.out)[0] + ".md", "x") as handle:
                handle.write(markdown)
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)


if __name__ == "__main__":
    main()
