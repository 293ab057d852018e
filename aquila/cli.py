"""The `aquila` command. Only parses arguments and calls the library.

    aquila convert SOURCE DEST [--dtype bf16]   a FlagAI or Hugging Face checkpoint -> the Hugging Face layout

(pretrain, sft, generate, chat, tokenizer, data and plot arrive with the issues that build them.)
"""

import argparse
import sys

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def convert(args):
    from aquila.model.checkpoint import load, save_hf

    model = load(args.source, dtype=DTYPES[args.dtype])
    save_hf(model, args.dest)
    print(f"{args.source} -> {args.dest} (Hugging Face layout, {args.dtype}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters)")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="aquila", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("convert", help="convert a FlagAI or Hugging Face checkpoint to the Hugging Face "
                                                  "layout (config.json + safetensors)")
    command.add_argument("source", help="checkpoint directory (FlagAI: config.json + .bin; HF: config.json + "
                                        "safetensors)")
    command.add_argument("dest", help="output directory (written atomically)")
    command.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    command.set_defaults(run=convert)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"aquila {args.command}: {error}")


if __name__ == "__main__":
    main()
