"""The `aquila` command. Only parses arguments and calls the library.

    aquila pretrain [--config FILE] [--resume] [--key value ...]   train (default: the demo run on the demo corpus)
    aquila sft --config FILE [--resume] [--key value ...]          supervised fine-tuning on conversations
    aquila plot RUN_DIR                           the loss curve and throughput of a run as PNG
    aquila data preprocess FILES --out PREFIX     tokenize documents into a Megatron .bin/.idx dataset
    aquila generate --checkpoint DIR "prompt"     continue a text (tokens/s on stderr)
    aquila chat --checkpoint DIR                  talk to a chat model (streaming, with history)
    aquila tokenizer train [FILES] --out DIR      train the byte-level BPE tokenizer (default: the demo corpus)
    aquila convert SOURCE DEST [--dtype bf16]     a FlagAI or Hugging Face checkpoint -> the Hugging Face layout
"""

import argparse
import os
import sys
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What the `train` extra installs (pyproject.toml), by the name it is imported as.
TRAIN_EXTRA_MODULES = {"safetensors", "tokenizers", "yaml", "tqdm", "matplotlib"}


def convert(args):
    from aquila.model.checkpoint import load, save_hf

    model = load(args.source, dtype=DTYPES[args.dtype])
    save_hf(model, args.dest)
    print(f"{args.source} -> {args.dest} (Hugging Face layout, {args.dtype}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters)")


def load_for_inference(args):
    """The model and tokenizer of a checkpoint directory (the tokenizer beside the weights unless --tokenizer)."""
    from aquila.data.tokenizer import Tokenizer
    from aquila.model.checkpoint import load
    from aquila.train.checkpoint import resolve

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    checkpoint = resolve(args.checkpoint)
    tokenizer = Tokenizer.load(args.tokenizer or checkpoint)
    model = load(checkpoint, dtype=DTYPES[args.dtype], device=device).eval()
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}: they do not belong together")
    return model, tokenizer


def sampling_from(args, tokenizer):
    from aquila.model.generate import Sampling

    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                    min_new_tokens=args.min_new_tokens, stop_tokens=(tokenizer.eos_id,), seed=args.seed)


def stream_to_stdout(model, tokenizer, prompt_ids, sampling, stop_strings) -> tuple[str, int, float]:
    """Prints the continuation as it is generated; returns it, the number of new tokens and the seconds taken."""
    from aquila.model.generate import stream_text

    text, steps = "", -1  # the last yield only flushes
    start = time.perf_counter()
    for pieces in stream_text(model, tokenizer, [prompt_ids], sampling, stop_strings):
        steps += 1
        print(pieces[0], end="", flush=True)
        text += pieces[0]
    return text, steps, time.perf_counter() - start


def generate(args):
    model, tokenizer = load_for_inference(args)
    prompt_ids = tokenizer.encode(args.prompt, bos=True)
    if not args.no_echo:
        print(args.prompt, end="", flush=True)
    _, steps, seconds = stream_to_stdout(model, tokenizer, prompt_ids, sampling_from(args, tokenizer), args.stop)
    print()
    print(f"[{steps} tokens in {seconds:.2f} s: {steps / max(seconds, 1e-9):.1f} tokens/s, prompt "
          f"{len(prompt_ids)} tokens, {model.output.weight.device}]", file=sys.stderr)


def chat(args):
    from aquila.model.chat import STOP_STRINGS, Message, clean_reply, render

    model, tokenizer = load_for_inference(args)
    sampling = sampling_from(args, tokenizer)
    history: list[Message] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chatting with the model; /reset forgets the history, /exit or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            line = input("You: " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            history.clear()
            continue
        if not line.strip():
            continue
        history.append(Message("human", line))
        while True:  # forget the oldest exchanges while the prompt leaves no room for the reply
            prompt = render(tokenizer, history, system=args.system, generation=True).ids
            if len(prompt) + sampling.max_new_tokens <= model.config.max_seq_len or len(history) == 1:
                break
            del history[:2]
        print("Aquila:", end="", flush=True)
        reply, steps, seconds = stream_to_stdout(model, tokenizer, prompt, sampling, STOP_STRINGS + tuple(args.stop))
        print()
        if interactive:
            print(f"[{steps / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
        history.append(Message("gpt", clean_reply(reply)))


def tokenizer_train(args):
    from aquila.data import demo_file
    from aquila.data.documents import read_documents
    from aquila.data.tokenizer import Tokenizer

    files = args.files or [demo_file("train.jsonl.gz")]
    start = time.perf_counter()
    tokenizer = Tokenizer.train(read_documents(files, args.key), vocab_size=args.vocab_size)
    tokenizer.save(args.out)
    print(f"{args.out}: {tokenizer.vocab_size} tokens (BOS {tokenizer.bos_id}, EOS {tokenizer.eos_id}) from "
          f"{len(files)} file(s) in {time.perf_counter() - start:.1f} s")


def run_training(args, kind: str):
    from aquila.train.config import TrainConfig
    from aquila.train.trainer import train

    config = TrainConfig.load(args.config, ["--kind", kind, *args.overrides] if kind == "sft" else args.overrides)
    if config.kind != kind:
        raise ValueError(f"{args.config} is a {config.kind} config; run it with `aquila {config.kind}`")
    summary = train(config, resume=args.resume)
    if summary["interrupted"]:
        sys.exit(f"stopped at step {summary['steps']} of {summary['total_steps']}; continue with --resume")


def plot(args):
    from aquila.train.metrics import plot as render

    metrics = os.path.join(args.directory, "metrics.jsonl") if os.path.isdir(args.directory) else args.directory
    print(render(metrics, args.out or os.path.join(os.path.dirname(metrics), "loss.png")))


def data_preprocess(args):
    from aquila.data.preprocess import format_stats, preprocess

    stats = preprocess(args.files, args.out, args.tokenizer, key=args.key, workers=args.workers)
    print(format_stats(stats))


def add_inference_arguments(command):
    command.add_argument("--checkpoint", required=True, help="checkpoint directory (Hugging Face or FlagAI layout)")
    command.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's)")
    command.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    command.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    command.add_argument("--max-new-tokens", type=int, default=128)
    command.add_argument("--min-new-tokens", type=int, default=0)
    command.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    command.add_argument("--top-k", type=int, default=50)
    command.add_argument("--top-p", type=float, default=0.9)
    command.add_argument("--repetition-penalty", type=float, default=1.1)
    command.add_argument("--seed", type=int)
    command.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aquila", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    for kind, text in (("pretrain", "pretrain a model (default: the demo run)"),
                       ("sft", "supervised fine-tuning on FlagAI-format conversations")):
        command = commands.add_parser(kind, help=text, epilog="Any config key can follow as --key value, e.g. "
                                                              "--lr 1e-4 --steps 100 --output-dir runs/x; a "
                                                              "boolean key alone means true: --overwrite (replace "
                                                              "the run in the output directory), "
                                                              "--allow-config-change (resume despite changed keys)")
        command.add_argument("--config", required=kind == "sft", help="YAML config (configs/*.yaml)")
        command.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
        command.set_defaults(run=lambda args, kind=kind: run_training(args, kind), overrides=[])

    command = commands.add_parser("plot", help="render a run's loss curve and throughput as PNG")
    command.add_argument("directory", metavar="RUN", help="run directory (or its metrics.jsonl)")
    command.add_argument("--out", help="PNG path (default: loss.png beside the metrics)")
    command.set_defaults(run=plot)

    data = commands.add_parser("data", help="dataset tools").add_subparsers(dest="action", required=True)
    command = data.add_parser("preprocess", help="tokenize jsonl/text into a Megatron .bin/.idx dataset")
    command.add_argument("files", nargs="+", help="jsonl(.gz/.xz) or text files")
    command.add_argument("--tokenizer", required=True, help="tokenizer directory")
    command.add_argument("--out", required=True, help="output prefix (writes PREFIX.bin and PREFIX.idx)")
    command.add_argument("--workers", type=int, default=0, help="encoding processes (0: one per CPU)")
    command.add_argument("--key", default="text", help="JSON key holding the text")
    command.set_defaults(run=data_preprocess)

    command = commands.add_parser("generate", help="continue a text prompt")
    add_inference_arguments(command)
    command.add_argument("prompt")
    command.add_argument("--no-echo", action="store_true", help="print only the continuation")
    command.set_defaults(run=generate)

    command = commands.add_parser("chat", help="interactive chat with the AquilaChat template")
    add_inference_arguments(command)
    command.add_argument("--system", help="system message (default: AquilaChat's)")
    command.set_defaults(run=chat)

    tokenizer = commands.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="action", required=True)
    command = tokenizer.add_parser("train", help="train the byte-level BPE tokenizer")
    command.add_argument("files", nargs="*", help="jsonl(.gz/.xz) or text files (default: the demo corpus)")
    command.add_argument("--out", required=True, help="output directory (written atomically)")
    command.add_argument("--vocab-size", type=int, default=100008, help="total, with the 8 special tokens")
    command.add_argument("--key", default="text", help="JSON key holding the text")
    command.set_defaults(run=tokenizer_train)

    command = commands.add_parser("convert", help="convert a FlagAI or Hugging Face checkpoint to the Hugging Face "
                                                  "layout (config.json + safetensors)")
    command.add_argument("source", help="checkpoint directory (FlagAI: config.json + .bin; HF: config.json + "
                                        "safetensors)")
    command.add_argument("dest", help="output directory (written atomically)")
    command.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    command.set_defaults(run=convert)
    return parser


def main(argv=None):
    command_line = parser()
    args, extra = command_line.parse_known_args(argv)
    if extra and args.command not in ("pretrain", "sft"):
        command_line.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        args.run(args)
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in TRAIN_EXTRA_MODULES:
            raise
        sys.exit(f"aquila {args.command}: needs the train extra (no module {error.name!r}): "
                 "pip install 'aquila[train]'")
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"aquila {args.command}: {error}")


if __name__ == "__main__":
    main()
