"""The `aquila` command on bad inputs and failing disks: one line naming the argument or file, a non-zero status, no
traceback (unless --debug), and nothing on disk lost."""

import errno
import gzip
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

from aquila.cli import main
from aquila.model.checkpoint import save_hf
from aquila.model.config import AquilaConfig
from aquila.model.model import Aquila

CONTEXT = 64


@pytest.fixture(scope="module")
def checkpoint(small_tokenizer, tmp_path_factory):
    """A tiny Hugging Face layout checkpoint with its tokenizer."""
    torch.manual_seed(0)
    model = Aquila(AquilaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=small_tokenizer.vocab_size,
                                multiple_of=16, max_seq_len=CONTEXT)).eval()
    directory = str(tmp_path_factory.mktemp("checkpoint"))
    save_hf(model, directory)
    small_tokenizer.save(directory)
    return directory


def copy_of(checkpoint, tmp_path, name="copy"):
    return shutil.copytree(checkpoint, tmp_path / name)


def fails_with(argv, message):
    """main(argv) exits with exactly `message` (one line)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == message
    assert "\n" not in message


def refused_argument(argv, message, capsys):
    """main(argv) stops in argument parsing, status 2, with exactly `message` on stderr (one line)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == message + "\n"


def snapshot(directory):
    return {os.path.relpath(os.path.join(root, name), directory): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(directory) for name in names}


def run_cli(arguments, tmp_path, **kwargs):
    code = f"import sys; from aquila.cli import main; main({arguments!r})"
    return subprocess.run([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, timeout=120, cwd=tmp_path,
                          **kwargs)


# --- broken checkpoints ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, reason", [
    (b"", "header too small"),
    (None, "incomplete metadata, file not fully covered"),  # the real file cut in half
    (b"not a safetensors file at all" * 4, "header too large"),
])
def test_a_broken_safetensors_file_is_named(checkpoint, tmp_path, content, reason):
    source = copy_of(checkpoint, tmp_path)
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2] if content is None else content)
    fails_with(["convert", str(source), str(tmp_path / "out")],
               f"aquila convert: {weights}: not a valid safetensors file (Error while deserializing header: {reason})")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config, message", [
    ({"hidden_size": 32, "num_attention_heads": 2}, "missing the key 'num_hidden_layers'"),
    ([1, 2], "expected a JSON object, got list"),
    ("{not json", "invalid JSON (Expecting property name enclosed in double quotes at line 1, column 2)"),
])
def test_a_bad_config_json_is_named(checkpoint, tmp_path, config, message):
    source = copy_of(checkpoint, tmp_path)
    (source / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    fails_with(["generate", "--checkpoint", str(source), "x", "--device", "cpu"],
               f"aquila generate: {source / 'config.json'}: {message}")


def test_a_flagai_bin_holding_a_list_is_named(tmp_path):
    source = tmp_path / "flagai"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"dim": 32, "n_layers": 1, "n_heads": 2, "vocab_size": 97}))
    torch.save([torch.zeros(2)], source / "pytorch_model.bin")
    fails_with(["convert", str(source), str(tmp_path / "out")],
               f"aquila convert: {source / 'pytorch_model.bin'}: expected a dict of parameter names to tensors, got "
               "list")
    (source / "pytorch_model.bin").write_bytes(b"garbage, not a zip or a pickle")
    with pytest.raises(SystemExit, match=f"aquila convert: {source / 'pytorch_model.bin'}: not a readable PyTorch "
                                         "weights file"):
        main(["convert", str(source), str(tmp_path / "out")])


def test_a_corrupt_tokenizer_json_is_named(checkpoint, tmp_path):
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(SystemExit, match=f"^aquila generate: Tokenizer.load: {tokenizer / 'tokenizer.json'} is not a "
                                         "valid tokenizer file"):
        main(["generate", "--checkpoint", checkpoint, "--tokenizer", str(tokenizer), "x", "--device", "cpu"])


# --- bad data ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix, compress", [(".jsonl.gz", gzip.compress), (".jsonl.xz", lzma.compress)])
def test_corrupt_compressed_input_to_preprocess_is_named(checkpoint, tmp_path, suffix, compress):
    data = compress("".join(json.dumps({"text": f"document {n}"}) + "\n" for n in range(5000)).encode())
    source = tmp_path / f"corpus{suffix}"
    source.write_bytes(data[:len(data) // 2])
    kind = "gzip" if suffix.endswith("gz") else "xz"
    with pytest.raises(SystemExit, match=rf"^aquila data preprocess: {source}: corrupt or truncated {kind} data "
                                         r"\(Compressed file ended before the end-of-stream marker was reached\) "
                                         r"after line \d+$"):
        main(["data", "preprocess", str(source), "--out", str(tmp_path / "out" / "corpus"), "--tokenizer",
              checkpoint, "--workers", "1"])
    assert os.listdir(tmp_path / "out") == []


def test_tokenizer_train_on_an_empty_corpus_names_the_files(tmp_path):
    files = [tmp_path / "a.jsonl", tmp_path / "b.txt"]
    files[0].write_text('{"text": ""}\n\n', encoding="utf-8")
    files[1].write_text("", encoding="utf-8")
    fails_with(["tokenizer", "train", *map(str, files), "--out", str(tmp_path / "tok"), "--vocab-size", "300"],
               f"aquila tokenizer train: no text to learn from in {files[0]}, {files[1]} (every document is empty)")
    assert not (tmp_path / "tok").exists()


# --- failing destinations -------------------------------------------------------------------------------------------

def test_a_full_disk_names_the_file(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world, hello there " * 20, encoding="utf-8")

    def full(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "tok"
    fails_with(["tokenizer", "train", str(corpus), "--out", str(out), "--vocab-size", "300"],
               f"aquila tokenizer train: {out / 'tokenizer.json'}: No space left on device")
    assert os.listdir(out) == []  # no temporary file left behind


def test_a_read_only_destination_names_the_directory(checkpoint, tmp_path, monkeypatch):
    """A read-only file system (simulated: tests may run as root, whom a read-only mode does not stop)."""
    out = tmp_path / "out"
    out.mkdir()

    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(dir, "tmpname"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    fails_with(["convert", checkpoint, str(out / "converted")],
               f"aquila convert: {out / 'tmpname'}: Read-only file system")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text", encoding="utf-8")
    fails_with(["data", "preprocess", str(corpus), "--out", str(out / "corpus"), "--tokenizer", checkpoint,
                "--workers", "1"], f"aquila data preprocess: {out}: Read-only file system")


# --- bad arguments --------------------------------------------------------------------------------------------------

def test_an_invalid_device_is_named(checkpoint, capsys):
    refused_argument(["generate", "--checkpoint", checkpoint, "x", "--device", "gpu0"],
                     "aquila generate: argument --device: 'gpu0' is not a device; use cpu, cuda or cuda:N "
                     "(see aquila generate --help)", capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_named(checkpoint, capsys):
    refused_argument(["chat", "--checkpoint", checkpoint, "--device", "cuda"],
                     "aquila chat: argument --device: 'cuda': CUDA is not available on this machine; use --device "
                     "cpu (see aquila chat --help)", capsys)


@pytest.mark.parametrize("option", ["--temperature", "--top-p", "--repetition-penalty"])
def test_a_non_finite_sampling_option_is_named(checkpoint, option, capsys):
    refused_argument(["generate", "--checkpoint", checkpoint, "x", option, "nan"],
                     f"aquila generate: argument {option}: expected a finite number, got 'nan' "
                     "(see aquila generate --help)", capsys)


def test_a_fractional_step_count_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fails_with(["pretrain", "--steps", "1.5"], "aquila pretrain: steps must be a whole number, got 1.5")
    assert os.listdir(tmp_path) == []


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "bad.yaml"
    config.write_text("lr: 1e-4\nsteps: [1, 2\nseq_len: 64\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=rf"^aquila pretrain: {config}:3:\d+: invalid YAML: "):
        main(["pretrain", "--config", str(config)])


def test_the_trainers_non_finite_loss_stop_is_one_line(tmp_path, monkeypatch):
    from aquila.train import trainer

    def diverging(config, resume=False):
        raise trainer.NonFiniteLossError("the loss was not finite for 5 steps in a row (step 12)")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainer, "train", diverging)
    fails_with(["pretrain", "--steps", "20"],
               "aquila pretrain: the loss was not finite for 5 steps in a row (step 12)")


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "generate", "--checkpoint", str(tmp_path), "x", "--device", "cpu"])
    with pytest.raises(FileNotFoundError):
        main(["generate", "--checkpoint", str(tmp_path), "x", "--device", "cpu", "--debug"])
    with pytest.raises(FileNotFoundError):
        main(["data", "preprocess", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x"), "--tokenizer",
              str(tmp_path), "--debug"])
    monkeypatch.setenv("AQUILA_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["generate", "--checkpoint", str(tmp_path), "x", "--device", "cpu"])


def test_an_unexpected_error_is_one_line_that_points_to_debug(checkpoint, monkeypatch):
    from aquila.model import checkpoint as module

    def broken(*args, **kwargs):
        raise RuntimeError("something\nunforeseen")

    monkeypatch.setattr(module, "load", broken)
    fails_with(["generate", "--checkpoint", checkpoint, "x", "--device", "cpu"],
               "aquila generate: unexpected RuntimeError: something unforeseen (rerun with --debug for the traceback)")


def test_ctrl_c_is_one_line_and_the_status_of_sigint(checkpoint, monkeypatch, capsys):
    from aquila.model import checkpoint as module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "load", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--checkpoint", checkpoint, "x", "--device", "cpu"])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "aquila generate: interrupted\n"


def test_chat_refuses_max_new_tokens_that_fill_the_context(checkpoint, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    fails_with(["chat", "--checkpoint", checkpoint, "--device", "cpu", "--max-new-tokens", str(CONTEXT)],
               f"aquila chat: --max-new-tokens {CONTEXT} leaves no room for a prompt in the model's context of "
               f"{CONTEXT} tokens")


def test_generate_into_a_closed_pipe_exits_quietly(checkpoint, tmp_path):
    """`aquila generate ... | head`: the reader is gone before anything is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = run_cli(["generate", "--checkpoint", checkpoint, "床前明月光", "--device", "cpu",
                          "--max-new-tokens", "5"], tmp_path, stdout=write_end)
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 141  # 128 + SIGPIPE, as for a process the signal ended


# --- prompts longer than the context --------------------------------------------------------------------------------

def test_a_prompt_longer_than_the_context_is_refused(checkpoint, capsys):
    prompt = "床前明月光，疑是地上霜。" * 20
    with pytest.raises(SystemExit, match=r"^aquila generate: the prompt is \d+ tokens; with --max-new-tokens 8 it "
                                         r"does not fit the model's context of 64 tokens \(shorten it, lower "
                                         r"--max-new-tokens, or pass --truncate-prompt to keep its last tokens\)$"):
        main(["generate", "--checkpoint", checkpoint, prompt, "--device", "cpu", "--max-new-tokens", "8"])
    assert capsys.readouterr().out == ""


def test_truncate_prompt_generates_from_the_prompts_end(checkpoint, small_tokenizer, capsys):
    from aquila.model.checkpoint import load
    from aquila.model.generate import Sampling, generate_text

    prompt = "床前明月光，疑是地上霜。" * 20
    main(["generate", "--checkpoint", checkpoint, prompt, "--device", "cpu", "--max-new-tokens", "8",
          "--temperature", "0", "--truncate-prompt", "--no-echo"])
    ids = small_tokenizer.encode(prompt, bos=True)[-(CONTEXT - 8):]
    sampling = Sampling(max_new_tokens=8, repetition_penalty=1.1, top_k=50, top_p=0.9,
                        stop_tokens=(small_tokenizer.eos_id,))
    expected = generate_text(load(checkpoint).eval(), small_tokenizer, [ids], sampling)[0]
    assert capsys.readouterr().out == expected + "\n"


def test_chat_refuses_a_message_longer_than_the_context(checkpoint, monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("床前明月光，疑是地上霜。" * 20 + "\n"))
    with pytest.raises(SystemExit, match=r"^aquila chat: the prompt is \d+ tokens; with --max-new-tokens 8 it does "
                                         "not fit the model's context of 64 tokens"):
        main(["chat", "--checkpoint", checkpoint, "--device", "cpu", "--max-new-tokens", "8"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("床前明月光，疑是地上霜。" * 20 + "\n"))
    main(["chat", "--checkpoint", checkpoint, "--device", "cpu", "--max-new-tokens", "8", "--truncate-prompt"])
    assert capsys.readouterr().out.startswith("Aquila:")


# --- convert never loses a file ---------------------------------------------------------------------------------------

def test_convert_refuses_a_non_empty_destination(checkpoint, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    fails_with(["convert", checkpoint, str(dest)],
               f"aquila convert: {dest} exists and is not empty; choose a new directory, or replace the checkpoint "
               "in it with overwrite=True (aquila convert --force)")
    fails_with(["convert", checkpoint, str(dest), "--force"],
               f"aquila convert: {dest} holds files that are not a checkpoint's config.json or safetensors "
               "(notes.txt); they would be lost, so it is not replaced")
    assert snapshot(dest) == {"notes.txt": b"mine"}


def test_convert_refuses_an_existing_file_as_destination(checkpoint, tmp_path):
    dest = tmp_path / "model.safetensors"
    dest.write_bytes(b"precious")
    for force in ([], ["--force"]):
        fails_with(["convert", checkpoint, str(dest), *force], f"aquila convert: {dest} exists and is not a directory")
    assert dest.read_bytes() == b"precious"


def test_convert_into_its_own_source_is_refused(checkpoint, tmp_path, monkeypatch):
    source = copy_of(checkpoint, tmp_path, "model")
    before = snapshot(source)
    (tmp_path / "link").symlink_to(source)
    monkeypatch.chdir(tmp_path)
    for dest in (str(source), "model", "./model/", str(tmp_path / "link")):
        for force in ([], ["--force"]):
            fails_with(["convert", str(source), dest, *force],
                       f"aquila convert: SOURCE and DEST are the same directory ({source}); convert into a new "
                       "directory")
    assert snapshot(source) == before


def test_convert_force_replaces_an_earlier_conversion(checkpoint, tmp_path):
    dest = tmp_path / "dest"
    main(["convert", checkpoint, str(dest), "--dtype", "bf16"])
    main(["convert", checkpoint, str(dest), "--dtype", "fp32", "--force"])
    assert sorted(os.listdir(dest)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["dest"]  # nothing moved aside is left behind
    from aquila.model.checkpoint import load

    assert load(str(dest)).output.weight.dtype == torch.float32


def test_convert_into_an_empty_directory_is_allowed(checkpoint, tmp_path):
    (tmp_path / "dest").mkdir()
    main(["convert", checkpoint, str(tmp_path / "dest")])
    assert sorted(os.listdir(tmp_path / "dest")) == ["config.json", "model.safetensors"]
