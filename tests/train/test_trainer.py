"""The trainer end to end on a tiny model and corpus: semantics, checkpoints, faults, and the CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from aquila.train.config import TrainConfig
from aquila.train.trainer import NonFiniteLossError, train
from tests.helpers import tiny_overrides as any_precision_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_overrides(inputs, output_dir, **changes):
    """The tiny run in fp32 unless a test asks otherwise: precision auto would choose bf16 on some hosts only."""
    return any_precision_overrides(inputs, output_dir, **{"precision": "fp32", **changes})


def run(inputs, output_dir, resume=False, log=lambda message: None, **changes):
    config = TrainConfig.load(None, tiny_overrides(inputs, output_dir, **changes))
    return train(config, resume=resume, log=log)


def train_losses(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    return [r["loss"] for r in records if r["kind"] == "train"]


@pytest.fixture(scope="module")
def reference_run(tiny_run_inputs, tmp_path_factory):
    output = tmp_path_factory.mktemp("reference")
    return output, run(tiny_run_inputs, output, steps=8)


def test_a_run_learns_and_leaves_a_usable_checkpoint(reference_run, small_tokenizer):
    output, summary = reference_run
    losses = summary["losses"]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.25  # from ln(520) = 6.25, uniform
    assert train_losses(output) == pytest.approx(losses)  # log_interval 1: one record per step
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if r["kind"] == "valid"]
    assert [r["step"] for r in valid] == [3, 6, 8] and all(r["perplexity"] > 1 for r in valid)
    train_record = records[0]
    assert {"lr", "grad_norm", "tokens_per_s", "mfu", "memory_mb", "tokens"} <= set(train_record)
    assert (output / "loss.png").stat().st_size > 1000
    checkpoint = summary["checkpoint"]
    assert (output / "checkpoints" / "latest").read_text().strip() == os.path.basename(checkpoint)
    # The checkpoint is a Hugging Face model directory with its tokenizer: our loader and transformers read it.
    from aquila.data.tokenizer import Tokenizer
    from aquila.model.checkpoint import load

    model = load(checkpoint)
    assert Tokenizer.load(checkpoint).encode("床前明月光") == small_tokenizer.encode("床前明月光")
    transformers = pytest.importorskip("transformers")
    reference = transformers.LlamaForCausalLM.from_pretrained(checkpoint).eval()
    tokens = torch.tensor([small_tokenizer.encode("def f(x): return x", bos=True)])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens).logits, rtol=1e-4, atol=1e-4)


def test_gradient_accumulation_equals_one_big_batch(tiny_run_inputs, reference_run, tmp_path):
    _, summary = reference_run
    accumulated = run(tiny_run_inputs, tmp_path, steps=8, batch_size=1, gradient_accumulation_steps=4)
    assert accumulated["losses"] == pytest.approx(summary["losses"], rel=2e-5)


def test_resume_continues_exactly(tiny_run_inputs, reference_run, tmp_path):
    _, summary = reference_run
    run(tiny_run_inputs, tmp_path, steps=8, save_interval=4)
    checkpoints = tmp_path / "checkpoints"
    # Crash after step 4's checkpoint: drop the final one, as if the run had died before it.
    (checkpoints / "step-000008").rename(tmp_path / "lost")
    (checkpoints / "latest").write_text("step-000008\n")
    resumed = run(tiny_run_inputs, tmp_path, resume=True, steps=8, save_interval=4)
    assert resumed["losses"] == pytest.approx(summary["losses"][4:], rel=1e-6)


def test_a_corrupt_checkpoint_falls_back_to_the_one_before(tiny_run_inputs, tmp_path):
    run(tiny_run_inputs, tmp_path, steps=4, save_interval=2, keep_checkpoints=3)
    checkpoints = tmp_path / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["latest", "step-000002", "step-000004"]
    for shard in (checkpoints / "step-000004" / "train_state").iterdir():
        shard.write_bytes(b"garbage")
    messages = []
    config = TrainConfig.load(None, tiny_overrides(tiny_run_inputs, tmp_path, steps=5, save_interval=2))
    summary = train(config, resume=True, log=messages.append)
    assert any("step-000004 cannot be loaded" in m for m in messages)
    assert any("resumed from" in m and "step-000002" in m for m in messages)
    assert len(summary["losses"]) == 3  # steps 3, 4 and 5 again


def test_non_finite_steps_are_skipped_then_stop_the_run(tiny_run_inputs, tmp_path, monkeypatch):
    from aquila.model.model import Aquila

    forward = Aquila.forward
    calls = {"n": 0}

    def poisoned(self, tokens, targets=None, **kw):
        loss = forward(self, tokens, targets, **kw)
        calls["n"] += 1
        return loss * float("nan") if targets is not None and self.training and calls["n"] > 2 else loss

    monkeypatch.setattr(Aquila, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="3 steps in a row had a non-finite loss"):
        run(tiny_run_inputs, tmp_path, steps=8, max_nonfinite_steps=3)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    skipped = [json.loads(line) for line in lines if '"skipped"' in line]
    assert [r["step"] for r in skipped] == [2, 3, 4]


def test_cpu_rejects_fp16(tiny_run_inputs, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    with pytest.raises(ValueError, match="precision fp16 needs a GPU"):
        run(tiny_run_inputs, tmp_path, precision="fp16")


@pytest.fixture(scope="module")
def bf16_run(tiny_run_inputs, tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("CPU bf16 (the GPU's is test_half_precision_training_on_gpu)")
    output, messages = tmp_path_factory.mktemp("bf16"), []
    return output, run(tiny_run_inputs, output, steps=8, precision="bf16", log=messages.append), messages


# bf16 keeps 8 significant bits: eps 2^-7 (the gap above 1), a rounding's relative error up to eps / 2. A step's loss
# is the mean of 128 token losses whose bf16 roundings (of activations, weights, gradients) are uncorrelated, so two
# runs that round differently differ by about eps / 2 / sqrt(128) = eps / 23 in a step, drifting over 8 steps of
# updates: eps / 8 (~1e-3, 50x fp32's 2e-5; measured on an AVX512-BF16 host: 9e-5 fp32 against bf16, 4e-5 DDP and
# 1.7e-4 FSDP against 1 process, all in bf16).
BF16_EPS = torch.finfo(torch.bfloat16).eps
BF16_RTOL = BF16_EPS / 8


def test_bf16_on_cpu_trains_over_fp32_master_weights(bf16_run, reference_run):
    from aquila.model.checkpoint import load
    from aquila.train.precision import cpu_bf16_isa

    output, summary, messages = bf16_run
    losses, fp32_losses = summary["losses"], reference_run[1]["losses"]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.25
    # The same run as fp32's but for bf16's rounding: each step's loss within a few bf16 ulps of fp32's.
    assert losses == pytest.approx(fp32_losses, rel=BF16_RTOL)
    assert losses != fp32_losses  # bf16 did run: fp32 would match bitwise
    isa = cpu_bf16_isa()
    expected = f"this CPU has {isa}" if isa else "warning: this CPU has no AMX or AVX512-BF16"
    assert any(m.startswith(f"precision bf16 (configured; {expected}") for m in messages), messages
    assert any(m.startswith("single on 1 x cpu, bf16:") for m in messages)
    model = load(summary["checkpoint"])
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # master weights stay fp32
    from safetensors.torch import load_file

    stored = load_file(str(output / "checkpoints" / "step-000008" / "model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.float32}


def test_bf16_resume_continues_exactly(tiny_run_inputs, bf16_run, tmp_path):
    _, summary, _ = bf16_run
    run(tiny_run_inputs, tmp_path, steps=8, save_interval=4, precision="bf16")
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step-000008").rename(tmp_path / "lost")
    (checkpoints / "latest").write_text("step-000008\n")
    resumed = run(tiny_run_inputs, tmp_path, resume=True, steps=8, save_interval=4, precision="bf16")
    assert resumed["losses"] == summary["losses"][4:]  # bitwise: fp32 master weights and AdamW state restored


def cli(*args, **popen):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "aquila.cli", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_run_inputs, tmp_path):
    process = cli("pretrain", *tiny_overrides(tiny_run_inputs, tmp_path, steps=10000, eval_interval=10000))
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1 and "continue with --resume" in err and "Traceback" not in err
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("-")[1])
    assert 2 <= step < 10000
    assert (tmp_path / "checkpoints" / latest / "model.safetensors").exists()


def torchrun(inputs, output, processes, **changes):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "aquila.cli", "pretrain", *tiny_overrides(inputs, output, **changes)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return train_losses(output)


@pytest.mark.parametrize("engine,zero_stage", [("fsdp", 2), ("fsdp", 3), ("ddp", 2)])
def test_two_processes_match_one_with_the_same_global_batch(tiny_run_inputs, reference_run, tmp_path, engine,
                                                             zero_stage):
    _, summary = reference_run
    losses = torchrun(tiny_run_inputs, tmp_path, 2, steps=8, batch_size=2, engine=engine, zero_stage=zero_stage)
    assert losses == pytest.approx(summary["losses"], rel=2e-5)
    assert (tmp_path / "checkpoints" / "step-000008" / "model.safetensors").exists()


@pytest.mark.parametrize("engine,zero_stage", [("fsdp", 2), ("fsdp", 3), ("ddp", 2)])
def test_two_processes_in_bf16_match_one(tiny_run_inputs, bf16_run, tmp_path, engine, zero_stage):
    """bf16 on 2 gloo processes against 1 process in bf16. Not bitwise: each process rounds its half-batch gradient
    to bf16 before the fp32 reduction, where 1 process rounds the whole batch's, and FSDP gathers the parameters in
    bf16 (gloo all-gathers bf16 on CPU), so its embeddings and residual stream are bf16 where autocast keeps fp32."""
    _, summary, _ = bf16_run
    losses = torchrun(tiny_run_inputs, tmp_path, 2, steps=8, batch_size=2, engine=engine, zero_stage=zero_stage,
                      precision="bf16")
    assert losses == pytest.approx(summary["losses"], rel=BF16_RTOL)
    from aquila.model.checkpoint import load

    model = load(str(tmp_path / "checkpoints" / "step-000008"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_sft_fine_tunes_a_pretraining_run_then_chat_uses_it(tiny_run_inputs, reference_run, tmp_path, capsys,
                                                            monkeypatch):
    import io

    from aquila.cli import main

    pretrained, _ = reference_run
    conversations = tmp_path / "chat.jsonl"
    with open(conversations, "w", encoding="utf-8") as handle:
        for i in range(24):
            record = {"id": str(i), "conversations": [{"from": "human", "value": f"第{i}句是什么？"},
                                                      {"from": "gpt", "value": "床前明月光，疑是地上霜。"}]}
            if i % 3 == 0:
                record["instruction"] = "Answer briefly."
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    output = tmp_path / "sft"
    config = TrainConfig.load(None, [*tiny_overrides(tiny_run_inputs, output, steps=10, lr=3e-3, eval_interval=5),
                                     "--kind", "sft", "--model", str(pretrained), "--model_overrides", "{}",
                                     "--tokenizer", "null", "--sft_data", str(conversations),
                                     "--valid_fraction", "0.25", "--seq_len", "64"])
    summary = train(config, log=lambda message: None)
    assert summary["losses"][-1] < summary["losses"][0] - 1.0  # one answer to learn: it is learned fast
    valid = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if '"valid"' in line]
    assert len(valid) == 2 and valid[-1]["loss"] < valid[0]["loss"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("第3句是什么？\n"))
    # The default system prompt alone outgrows this tiny model's 64-token context: the chat keeps the prompt's end.
    main(["chat", "--checkpoint", str(output), "--temperature", "0", "--max-new-tokens", "30", "--truncate-prompt"])
    assert capsys.readouterr().out.startswith("Aquila:")


def test_plot_and_preprocess_commands(reference_run, tiny_run_inputs, tmp_path, capsys):
    from aquila.cli import main
    from aquila.data.indexed import IndexedDataset

    output, _ = reference_run
    main(["plot", str(output), "--out", str(tmp_path / "curve.png")])
    assert (tmp_path / "curve.png").stat().st_size > 1000
    main(["data", "preprocess", str(tiny_run_inputs / "valid.jsonl"), "--tokenizer",
          str(tiny_run_inputs / "tokenizer"), "--out", str(tmp_path / "valid"), "--workers", "1"])
    assert "tokens" in capsys.readouterr().out
    assert len(IndexedDataset(str(tmp_path / "valid"))) == 10
    with pytest.raises(SystemExit, match="tokens_per_s|no training records|metrics"):
        (tmp_path / "empty.jsonl").write_text("")
        main(["plot", str(tmp_path / "empty.jsonl")])


def test_tensorboard_without_the_package_is_a_clear_error(tiny_run_inputs, tmp_path):
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="tensorboard: true needs the tensorboard package"):
        run(tiny_run_inputs, tmp_path, steps=1, tensorboard=True)


def test_tokens_outside_the_vocabulary_are_found_before_training(tiny_run_inputs, tmp_path):
    from aquila.data.indexed import IndexedDatasetWriter

    with IndexedDatasetWriter(str(tmp_path / "bad"), "int32") as writer:
        writer.add_document([1, 2, 3, 600])  # the model has 520 tokens
        writer.add_document([4, 5, 6, 7])
    with pytest.raises(ValueError, match=r"bad: token id 600 is outside the model's vocabulary of 520"):
        run(tiny_run_inputs, tmp_path / "out", train_data=f"[{tmp_path / 'bad'}]", valid_fraction=0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_training_on_gpu(tiny_run_inputs, tmp_path, precision):
    """bf16 autocast over fp32 master weights, and fp16 with dynamic loss scaling: the loss falls and stays finite."""
    summary = run(tiny_run_inputs, tmp_path, steps=8, precision=precision)
    losses = summary["losses"]
    assert all(loss == loss for loss in losses) and losses[-1] < losses[0]
    from aquila.model.checkpoint import load

    assert next(load(summary["checkpoint"]).parameters()).dtype == torch.float32  # master weights stay fp32


def test_sft_token_ids_outside_the_vocabulary_are_found_before_training(small_tokenizer, tmp_path):
    from aquila.train.data import SFTData
    from aquila.train.engine import Processes

    config = TrainConfig(kind="sft", seq_len=256, valid_fraction=0.25, output_dir=str(tmp_path))
    data = SFTData(config, small_tokenizer, Processes(0, 1, 0, torch.device("cpu")))
    data.check_vocabulary(small_tokenizer.vocab_size)
    with pytest.raises(ValueError,
                       match=r"the demo conversations: token id \d+ is outside the model's vocabulary of 100"):
        data.check_vocabulary(100)


@pytest.mark.parametrize("implementation", ["data.PretrainingData", "data.SFTData", "engine.TorchOptimization",
                                            "bmtrain_engine.BMTrainOptimization"])
def test_data_and_engines_implement_every_member_of_their_protocol(implementation):
    """The trainer relies on the protocols alone; a member left to the protocol's empty default would return None."""
    import importlib

    from aquila.train.data import TrainingData
    from aquila.train.engine import Optimization

    module, name = implementation.split(".")
    cls = getattr(importlib.import_module(f"aquila.train.{module}"), name)
    protocol = TrainingData if module == "data" else Optimization
    members = [member for member, value in vars(protocol).items()
               if not member.startswith("_") and (callable(value) or isinstance(value, property))]
    assert protocol in cls.__mro__ and members
    assert [member for member in members if member not in vars(cls)] == []
