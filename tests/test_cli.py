"""The `aquila` command end to end on a tiny random model saved as a checkpoint with its tokenizer."""

import io
import os
import subprocess
import sys

import pytest
import torch

from aquila.cli import main
from aquila.model.chat import STOP_STRINGS, Message, clean_reply, render
from aquila.model.checkpoint import save_hf
from aquila.model.config import AquilaConfig
from aquila.model.generate import Sampling, generate_text
from aquila.model.model import Aquila

GREEDY = ["--temperature", "0", "--max-new-tokens", "10"]


@pytest.fixture(scope="module")
def checkpoint(small_tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    model = Aquila(AquilaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=small_tokenizer.vocab_size,
                                multiple_of=16, max_seq_len=512)).eval()
    directory = str(tmp_path_factory.mktemp("checkpoint"))
    save_hf(model, directory)
    small_tokenizer.save(directory)
    return directory, model


def greedy(tokens_limit=10, **kw):
    return Sampling(max_new_tokens=tokens_limit, repetition_penalty=1.1, top_k=50, top_p=0.9, **kw)


def test_generate_prints_the_prompt_and_its_continuation(checkpoint, small_tokenizer, capsys):
    directory, model = checkpoint
    main(["generate", "--checkpoint", directory, "床前明月光", *GREEDY])
    out, err = capsys.readouterr()
    expected = generate_text(model, small_tokenizer, [small_tokenizer.encode("床前明月光", bos=True)],
                             greedy(stop_tokens=(small_tokenizer.eos_id,)))[0]
    assert out == "床前明月光" + expected + "\n"
    assert "tokens/s" in err


def test_chat_keeps_history_and_forgets_it_on_reset(checkpoint, small_tokenizer, capsys, monkeypatch):
    directory, model = checkpoint
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\nand then?\n/reset\nhello\n/exit\nnever read\n"))
    main(["chat", "--checkpoint", directory, *GREEDY])
    out = capsys.readouterr().out
    assert out.startswith("Aquila:") and out.endswith("\n")
    replies = [reply.removesuffix("\n") for reply in out.split("Aquila:")[1:]]  # random replies may hold newlines
    assert len(replies) == 3

    def expected(history):
        prompt = render(small_tokenizer, history, generation=True).ids
        return generate_text(model, small_tokenizer, [prompt], greedy(stop_tokens=(small_tokenizer.eos_id,)),
                             STOP_STRINGS)[0]

    first = expected([Message("human", "你好")])
    second = expected([Message("human", "你好"), Message("gpt", clean_reply(first)), Message("human", "and then?")])
    assert replies == [first, second, expected([Message("human", "hello")])]


def test_errors_are_one_line_messages(checkpoint, tmp_path):
    with pytest.raises(SystemExit, match="aquila generate: .*no such|aquila generate: .*neither"):
        main(["generate", "--checkpoint", str(tmp_path), "x"])
    with pytest.raises(SystemExit, match=r"aquila generate: Sampling: top_p must be in \(0, 1\]"):
        main(["generate", "--checkpoint", checkpoint[0], "x", "--top-p", "0"])


def test_tokenizer_train_command(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "床前明月光，疑是地上霜。"}\n{"text": "hello world hello world"}\n' * 20,
                      encoding="utf-8")
    main(["tokenizer", "train", str(corpus), "--out", str(tmp_path / "tok"), "--vocab-size", "300"])
    assert "300 tokens (BOS 298, EOS 299)" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(SystemExit, match="bad.jsonl:2: key 'text' must hold a string"):
        main(["tokenizer", "train", str(bad), "--out", str(tmp_path / "tok2"), "--vocab-size", "300"])


def test_chat_forgets_the_oldest_exchanges_when_the_context_is_full(checkpoint, small_tokenizer, capsys,
                                                                   monkeypatch):
    directory, model = checkpoint
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\nand then?\n"))
    room = 512 - len(render(small_tokenizer, [Message("human", "你好")], generation=True).ids)
    main(["chat", "--checkpoint", directory, "--temperature", "0", "--max-new-tokens", str(room)])
    replies = [reply.removesuffix("\n") for reply in capsys.readouterr().out.split("Aquila:")[1:]]
    alone = render(small_tokenizer, [Message("human", "and then?")], generation=True).ids
    expected = generate_text(model, small_tokenizer, [alone],
                             greedy(room, stop_tokens=(small_tokenizer.eos_id,)), STOP_STRINGS)[0]
    assert replies[1] == expected  # the first exchange no longer fits beside a reply of `room` tokens


def test_a_missing_extra_is_named_with_its_install_line(tmp_path):
    """`pip install aquila` without [train] gives the kernels; the commands that need more say what to install."""
    code = "import sys; sys.modules['yaml'] = None; from aquila.cli import main; main(['pretrain', '--steps', '1'])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == ("aquila pretrain: needs the train extra (no module 'yaml'): "
                                     "pip install 'aquila[train]'")
    assert os.listdir(tmp_path) == []


def test_the_kernels_import_without_the_extras():
    """aquila.kernels needs torch and numpy alone (pyproject.toml's dependencies)."""
    extras = ["safetensors", "tokenizers", "yaml", "tqdm", "matplotlib", "triton", "transformers"]
    code = ("import sys\n"
            f"for name in {extras!r}: sys.modules[name] = None\n"
            "import torch, aquila.kernels as k\n"
            "x = torch.randn(3, 8)\n"
            "print(k.rms_norm(x, torch.ones(8)).shape)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch.Size([3, 8])"
