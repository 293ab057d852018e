"""The `aquila` command. Only parses arguments and calls the library.

    aquila pretrain [--config FILE] [--resume] [--key value ...]   train (default: the demo run on the demo corpus)
    aquila sft --config FILE [--resume] [--key value ...]          supervised fine-tuning on conversations
    aquila plot RUN_DIR                           the loss curve and throughput of a run as PNG
    aquila data preprocess FILES --out PREFIX     tokenize documents into a Megatron .bin/.idx dataset
    aquila generate --checkpoint DIR "prompt"     continue a text (tokens/s on stderr)
    aquila chat --checkpoint DIR                  talk to a chat model (streaming, with history)
    aquila tokenizer train [FILES] --out DIR      train the byte-level BPE tokenizer (default: the demo corpus)
    aquila convert SOURCE DEST [--dtype bf16]     a FlagAI or Hugging Face checkpoint -> the Hugging Face layout
    aquila quantize SOURCE DEST --bits 4|8        a checkpoint with int8 or int4 weight-only linears
    aquila random-checkpoint --preset NAME DEST   random weights of any size (Hugging Face layout, bf16)

A bad input or a failure ends the command with one line naming the argument or file, and a non-zero status; --debug
(or AQUILA_DEBUG=1) shows the traceback instead.
"""

import argparse
import itertools
import math
import os
import signal
import sys
import time
from typing import Optional

import torch

from aquila.model.quantize import DEFAULT_GROUP_SIZE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZE_BITS = {"int8": 8, "int4": 4}
OUTPUT_PROJECTION_BITS = {"int8": 8, "int4": 4, "dense": None}
# What the `train` extra installs (pyproject.toml), by the name it is imported as.
TRAIN_EXTRA_MODULES = {"safetensors", "tokenizers", "yaml", "tqdm", "matplotlib"}


def convert(args):
    from aquila.model.checkpoint import check_destination, load, save_hf

    if os.path.exists(args.dest) and os.path.exists(args.source) and os.path.samefile(args.source, args.dest):
        raise ValueError(f"SOURCE and DEST are the same directory ({os.path.realpath(args.dest)}); convert into a new "
                         "directory")
    check_destination(os.path.realpath(args.dest), overwrite=args.force)  # before the minutes that loading takes
    model = load(args.source, dtype=DTYPES[args.dtype])
    save_hf(model, args.dest, overwrite=args.force)
    print(f"{args.source} -> {args.dest} (Hugging Face layout, {args.dtype}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters)")


def quantization_from(args, bits: Optional[int]):
    """The Quantization that --group-size, --asymmetric and --output-projection describe for `bits` (None: no
    quantization, and then none of them may be given)."""
    from aquila.model.quantize import Quantization

    if bits is None:
        if args.group_size is not None or args.asymmetric:
            raise ValueError("--group-size and --asymmetric describe int4 quantization; add --quantize int4")
        if args.output_projection is not None:
            raise ValueError("--output-projection describes a quantized model; add --quantize int8 or int4")
        return None
    if bits == 8 and (args.group_size is not None or args.asymmetric):
        raise ValueError("--group-size and --asymmetric apply to int4 only: int8 is symmetric, one scale per output "
                         "channel")
    if args.group_size is not None and (args.group_size < 2 or args.group_size % 2):
        raise ValueError(f"--group-size must be an even number >= 2, got {args.group_size}")
    if args.output_projection == "int4" and bits != 4:
        raise ValueError("--output-projection int4 quantizes the output projection as the int4 blocks; int8 blocks "
                         "take int8 or dense")
    return Quantization(bits, args.group_size, symmetric=not args.asymmetric,
                        output_bits=OUTPUT_PROJECTION_BITS[args.output_projection or "int8"])


def quantize(args):
    from aquila.model.checkpoint import check_destination, checkpoint_quantization, load, save_hf

    if os.path.exists(args.dest) and os.path.exists(args.source) and os.path.samefile(args.source, args.dest):
        raise ValueError(f"SOURCE and DEST are the same directory ({os.path.realpath(args.dest)}); quantize into a "
                         "new directory")
    spec = quantization_from(args, args.bits)
    stored = checkpoint_quantization(args.source) if os.path.isfile(os.path.join(args.source, "config.json")) else None
    if stored is not None:
        raise ValueError(f"{args.source} is already quantized ({stored.describe()}); quantize the original weights")
    # Before the minutes that loading takes.
    check_destination(os.path.realpath(args.dest), overwrite=args.overwrite, how_to_replace="--overwrite")
    model = load(args.source, dtype=DTYPES[args.dtype], quantize=spec)
    save_hf(model, args.dest, overwrite=args.overwrite)
    size = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    print(f"{args.source} -> {args.dest} ({spec.describe()}, unquantized tensors in {args.dtype}, "
          f"{size / 2**20:,.1f} MiB of weights)")


def random_checkpoint(args):
    from aquila.model.checkpoint import check_destination, read_json, save_random_hf
    from aquila.model.config import AquilaConfig

    if args.preset:
        config = AquilaConfig.preset(args.preset)
    else:
        values = read_json(args.config)  # its errors name the file
        try:
            config = AquilaConfig.from_dict(values)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{args.config}: {error}") from None
    check_destination(os.path.realpath(args.dest), overwrite=args.overwrite, how_to_replace="--overwrite")
    save_random_hf(config, args.dest, seed=args.seed, dtype=DTYPES[args.dtype], overwrite=args.overwrite)
    print(f"{args.dest}: random {args.preset or args.config} weights, seed {args.seed}, {args.dtype}, "
          f"{config.num_parameters():,} parameters")


def load_for_inference(args):
    """The model and tokenizer of a checkpoint directory (the tokenizer beside the weights unless --tokenizer),
    quantized while loading with --quantize."""
    from aquila.data.tokenizer import Tokenizer
    from aquila.model.checkpoint import load
    from aquila.train.checkpoint import resolve

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    spec = quantization_from(args, QUANTIZE_BITS.get(args.quantize))
    checkpoint = resolve(args.checkpoint)
    tokenizer = Tokenizer.load(args.tokenizer or checkpoint)
    model = load(checkpoint, dtype=DTYPES[args.dtype], device=device, quantize=spec).eval()
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}: they do not belong together")
    return model, tokenizer


def sampling_from(args, tokenizer):
    from aquila.model.generate import Sampling

    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                    min_new_tokens=args.min_new_tokens, stop_tokens=(tokenizer.eos_id,), seed=args.seed)


def prompt_room(model, prompt_ids, args) -> Optional[str]:
    """Why the prompt does not fit the model's context beside --max-new-tokens, or None when it fits or
    --truncate-prompt lets generation keep its end."""
    room = model.config.max_seq_len - args.max_new_tokens
    if room < 1:
        return (f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's context of "
                f"{model.config.max_seq_len} tokens")
    if len(prompt_ids) <= room or args.truncate_prompt:
        return None
    return (f"the prompt is {len(prompt_ids)} tokens; with --max-new-tokens {args.max_new_tokens} it does not fit "
            f"the model's context of {model.config.max_seq_len} tokens (shorten it, lower --max-new-tokens, or "
            "pass --truncate-prompt to keep its last tokens)")


def stream_to_stdout(model, tokenizer, prompt_ids, sampling, stop_strings,
                     truncate_prompt: bool) -> tuple[str, int, float]:
    """Prints the continuation as it is generated; returns it, the number of new tokens and the seconds taken."""
    from aquila.model.generate import stream_text

    text, steps = "", -1  # the last yield only flushes
    start = time.perf_counter()
    for pieces in stream_text(model, tokenizer, [prompt_ids], sampling, stop_strings, truncate_prompt):
        steps += 1
        print(pieces[0], end="", flush=True)
        text += pieces[0]
    return text, steps, time.perf_counter() - start


def generate(args):
    model, tokenizer = load_for_inference(args)
    prompt_ids = tokenizer.encode(args.prompt, bos=True)
    sampling = sampling_from(args, tokenizer)
    problem = prompt_room(model, prompt_ids, args)
    if problem:
        raise ValueError(problem)
    if not args.no_echo:
        print(args.prompt, end="", flush=True)
    _, steps, seconds = stream_to_stdout(model, tokenizer, prompt_ids, sampling, args.stop, args.truncate_prompt)
    print()
    print(f"[{steps} tokens in {seconds:.2f} s: {steps / max(seconds, 1e-9):.1f} tokens/s, prompt "
          f"{len(prompt_ids)} tokens, {model.tok_embeddings.weight.device}]", file=sys.stderr)


def chat(args):
    from aquila.model.chat import STOP_STRINGS, Message, clean_reply, render

    model, tokenizer = load_for_inference(args)
    sampling = sampling_from(args, tokenizer)
    problem = prompt_room(model, [], args)  # --max-new-tokens alone may leave no room for any message
    if problem:
        raise ValueError(problem)
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
        problem = prompt_room(model, prompt, args)
        if problem:
            if not interactive:
                raise ValueError(problem)
            print(f"aquila chat: {problem}; the message was not sent", file=sys.stderr)
            history.pop()
            continue
        print("Aquila:", end="", flush=True)
        reply, steps, seconds = stream_to_stdout(model, tokenizer, prompt, sampling, STOP_STRINGS + tuple(args.stop),
                                                 args.truncate_prompt)
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
    documents = read_documents(files, args.key)
    first = next((text for text in documents if text), None)  # before training, to name the files
    if first is None:
        raise ValueError(f"no text to learn from in {', '.join(files)} (every document is empty)")
    tokenizer = Tokenizer.train(itertools.chain([first], documents), vocab_size=args.vocab_size)
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


def device_argument(text: str) -> str:
    """--device: cpu, cuda or cuda:N, refused here when this machine cannot run it (rather than deep in loading)."""
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return text
    if parsed.type != "cuda":
        raise argparse.ArgumentTypeError(f"{text!r}: only cpu and cuda devices are supported")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine; use --device cpu")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def add_inference_arguments(command):
    command.add_argument("--checkpoint", required=True, help="checkpoint directory (Hugging Face or FlagAI layout)")
    command.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's)")
    command.add_argument("--device", type=device_argument, help="cpu, cuda or cuda:N (default: cuda when present)")
    command.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                         help="the weights' dtype (with --quantize: of those not quantized) and the compute dtype")
    command.add_argument("--quantize", choices=sorted(QUANTIZE_BITS),
                         help="quantize the linear layers while loading (weight-only; the output projection as "
                              "--output-projection says; embeddings and norms stay in --dtype)")
    add_quantization_arguments(command)
    command.add_argument("--max-new-tokens", type=int, default=128)
    command.add_argument("--min-new-tokens", type=int, default=0)
    command.add_argument("--temperature", type=finite_float, default=0.7, help="0 is greedy")
    command.add_argument("--top-k", type=int, default=50)
    command.add_argument("--top-p", type=finite_float, default=0.9)
    command.add_argument("--repetition-penalty", type=finite_float, default=1.1)
    command.add_argument("--seed", type=int)
    command.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    command.add_argument("--truncate-prompt", action="store_true",
                         help="cut a prompt too long for the model's context from the left (default: an error)")


def add_quantization_arguments(command):
    command.add_argument("--group-size", type=int,
                         help=f"int4: input columns per scale (default {DEFAULT_GROUP_SIZE}); must divide every "
                              "layer's input size")
    command.add_argument("--asymmetric", action="store_true",
                         help="int4: a zero point per group besides its scale (default: symmetric)")
    command.add_argument("--output-projection", choices=sorted(OUTPUT_PROJECTION_BITS),
                         help="the output projection (lm_head): int8, one scale per output channel (the default); "
                              "int4, as the int4 blocks; dense, kept in --dtype")


class Parser(argparse.ArgumentParser):
    """argparse's parser with errors on one line (argparse prints the usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    from aquila.model.config import PRESETS

    parser = Parser(prog="aquila", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also AQUILA_DEBUG=1)")
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
    command.add_argument("dest", help="output directory, new or empty (written atomically)")
    command.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    command.add_argument("--force", action="store_true",
                         help="replace a checkpoint already in DEST. Only a DEST that holds nothing but config.json "
                              "and model*.safetensors files is replaced (the new checkpoint is written beside it "
                              "and swapped in); any other file, a tokenizer included, is never deleted, so such a "
                              "DEST is refused")
    command.set_defaults(run=convert)

    command = commands.add_parser("quantize", help="a checkpoint with weight-only int8 or int4 linear layers "
                                                   "(safetensors; format in docs/model.md)")
    command.add_argument("source", help="checkpoint directory (Hugging Face or FlagAI layout)")
    command.add_argument("dest", help="output directory, new or empty (written atomically)")
    command.add_argument("--bits", type=int, choices=(4, 8), required=True,
                         help="8: int8, one scale per output channel; 4: int4 in groups along the input")
    add_quantization_arguments(command)
    command.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                         help="dtype of the tensors not quantized: embeddings, norms (and a dense output "
                              "projection)")
    command.add_argument("--overwrite", action="store_true",
                         help="replace a checkpoint already in DEST (only a DEST that holds nothing but config.json "
                              "and model*.safetensors files)")
    command.set_defaults(run=quantize)

    command = commands.add_parser("random-checkpoint", help="a checkpoint of random weights in the Hugging Face "
                                                            "layout, for tests and benchmarks (written as drawn)")
    command.add_argument("dest", help="output directory, new or empty (written atomically)")
    shape = command.add_mutually_exclusive_group(required=True)
    shape.add_argument("--preset", choices=sorted(PRESETS), help="the model's shape")
    shape.add_argument("--config", help="the model's shape as an AquilaConfig JSON file")
    command.add_argument("--seed", type=int, default=0, help="the same seed gives the same weights")
    command.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    command.add_argument("--overwrite", action="store_true",
                         help="replace a checkpoint already in DEST (only a DEST that holds nothing but config.json "
                              "and model*.safetensors files)")
    command.set_defaults(run=random_checkpoint)
    add_to_every_command(parser, "--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show the traceback of an error")
    return parser


def add_to_every_command(parser: argparse.ArgumentParser, *names, **options) -> None:
    """An option each command accepts after its name too (`aquila generate ... --debug`); SUPPRESS as the default
    keeps the value given before the command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                if any(isinstance(a, argparse._SubParsersAction) for a in command._actions):
                    add_to_every_command(command, *names, **options)
                else:
                    command.add_argument(*names, **options)


def command_name(args) -> str:
    return " ".join(["aquila", args.command, *([args.action] if getattr(args, "action", None) else [])])


def one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def error_message(error: BaseException) -> Optional[str]:
    """The one-line message for an error a bad input or a failing disk causes; None for anything else (a bug)."""
    yaml = sys.modules.get("yaml")  # imported by whatever could raise its errors
    trainer = sys.modules.get("aquila.train.trainer")
    preprocess = sys.modules.get("aquila.data.preprocess")
    if yaml is not None and isinstance(error, yaml.YAMLError):
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or str(error)
        if mark is None:
            return f"invalid YAML: {one_line(problem)}"
        where = mark.name if mark.name and not mark.name.startswith("<") else "an override on the command line"
        return f"{where}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {one_line(problem)}"
    if isinstance(error, OSError) and error.filename is not None:
        target = f"{error.filename} -> {error.filename2}" if error.filename2 else error.filename
        return f"{target}: {error.strerror or error}"
    known = [ValueError, OSError]
    known += [trainer.NonFiniteLossError] if trainer is not None else []
    known += [preprocess.WorkerDiedError] if preprocess is not None else []
    if isinstance(error, tuple(known)):
        return one_line(str(error)) or type(error).__name__
    return None


def main(argv=None):
    command_line = parser()
    args, extra = command_line.parse_known_args(argv)
    if extra and args.command not in ("pretrain", "sft"):
        command_line.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    name = command_name(args)
    debug = args.debug or os.environ.get("AQUILA_DEBUG", "") not in ("", "0")
    try:
        args.run(args)
    except BrokenPipeError:
        # The reader went away (`aquila generate ... | head`): stop quietly, as Unix tools do, with the status of
        # a process ended by SIGPIPE. stdout goes to /dev/null so that Python's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)  # the status of a process that Ctrl-C ended
    except Exception as error:
        if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] in TRAIN_EXTRA_MODULES:
            sys.exit(f"{name}: needs the train extra (no module {error.name!r}): pip install 'aquila[train]'")
        if debug:
            raise
        message = error_message(error)
        if message is None:
            message = (f"unexpected {type(error).__name__}: {one_line(str(error))} (rerun with --debug for the "
                       "traceback)")
        sys.exit(f"{name}: {message}")


if __name__ == "__main__":
    main()
