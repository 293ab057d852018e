import dataclasses
import os

import pytest

from aquila.model.config import AquilaConfig
from aquila.train.config import DEFAULT_STEPS, TrainConfig
from aquila.train.trainer import learning_rate, parameter_groups, total_steps

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_yaml_spells_out_the_defaults():
    """`aquila pretrain` with no arguments and with configs/demo.yaml are the same run."""
    demo = TrainConfig.load(os.path.join(ROOT, "configs", "demo.yaml"))
    assert demo.steps == DEFAULT_STEPS and dataclasses.replace(demo, steps=None) == TrainConfig()


PRETRAINING_AT_SCALE = dict(kind="pretrain", tokenizer="tokenizers/aquila-100k",
                           train_data=["data/corpus_text_document", 1.0], valid_fraction=0.001, seq_len=2048,
                           train_tokens=100_000_000_000, warm_up=2000, precision="bf16", engine="fsdp",
                           activation_checkpointing=True, eval_interval=1000, eval_batches=20, save_interval=1000,
                           keep_checkpoints=3)
# Each shipped config's values that differ from the defaults, as its comments document them.
SHIPPED_CONFIGS = {
    "chat-demo.yaml": dict(kind="sft", model="runs/demo", sft_data=None, valid_fraction=0.05, batch_size=8, epochs=3.0,
                           lr=3e-4, weight_decay=0.0, log_interval=5, eval_interval=50, output_dir="runs/chat-demo"),
    "aquila-7b.yaml": dict(PRETRAINING_AT_SCALE, model="aquila-7b", batch_size=4, gradient_accumulation_steps=8,
                           lr=3e-4, zero_stage=2, output_dir="runs/aquila-7b"),
    "aquila-33b.yaml": dict(PRETRAINING_AT_SCALE, model="aquila-33b", batch_size=1, gradient_accumulation_steps=32,
                            lr=1.5e-4, zero_stage=3, output_dir="runs/aquila-33b"),
}
# (dim, layers, heads, SwiGLU width, vocabulary) of the presets, as the configs' comments give them.
PRESET_SHAPES = {"aquila-7b": (4096, 32, 32, 11008, 100008), "aquila-33b": (6656, 60, 52, 17920, 100008)}


@pytest.mark.parametrize("name", sorted(SHIPPED_CONFIGS))
def test_shipped_configs_load_to_their_documented_values(name):
    loaded = TrainConfig.load(os.path.join(ROOT, "configs", name))
    assert loaded == dataclasses.replace(TrainConfig(), **SHIPPED_CONFIGS[name])
    if loaded.model in PRESET_SHAPES:
        preset = AquilaConfig.preset(loaded.model)
        shape = (preset.dim, preset.n_layers, preset.n_heads, preset.hidden_dim, preset.vocab_size)
        assert shape == PRESET_SHAPES[loaded.model]


def test_the_demo_run_is_a_7_3m_parameter_model():
    assert round(AquilaConfig.preset(TrainConfig().model).num_parameters() / 1e6, 1) == 7.3


def test_flagai_keys_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("batch_size: 4\ngradient_accumulation_steps: 2\nlr: 2e-4\nwarm_up: 0.01\nepochs: 1\n"
                    "adam_beta2: 0.95\nclip_grad: 1.0\nsave_interval: 1000\n")
    config = TrainConfig.load(str(path), ["--lr", "1e-4", "--train-data", "[a, 1, b, 3]", "--epochs=2"])
    assert (config.batch_size, config.gradient_accumulation_steps, config.lr) == (4, 2, 1e-4)
    assert isinstance(config.lr, float) and config.epochs == 2.0 and config.train_data == ["a", 1, "b", 3]
    # A budget given on the command line replaces the file's (epochs: 1 there).
    assert TrainConfig.load(str(path), ["--steps", "7"]).steps == 7
    assert TrainConfig.load(str(path), ["--steps", "7"]).epochs is None


def test_unknown_and_bad_values_are_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("batch_size: 4\nlearning_rate: 1e-4\n")
    with pytest.raises(ValueError, match=r"run.yaml: unknown keys \['learning_rate'\]"):
        TrainConfig.load(str(path))
    with pytest.raises(ValueError, match="override --bogus: unknown key"):
        TrainConfig.load(None, ["--bogus", "1"])
    with pytest.raises(ValueError, match="override --lr: missing its value"):
        TrainConfig.load(None, ["--lr"])
    with pytest.raises(ValueError, match="lr must be a float, got 'fast'"):
        TrainConfig.load(None, ["--lr", "fast"])
    with pytest.raises(ValueError, match="give one of steps, train_tokens and epochs"):
        TrainConfig(steps=3, epochs=1)
    with pytest.raises(ValueError, match="engine must be one of"):
        TrainConfig(engine="deepspeed")
    with pytest.raises(ValueError, match="zero_stage must be 2 or 3"):
        TrainConfig(zero_stage=1)


def test_negative_weight_decay_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"^TrainConfig: weight_decay must be >= 0, got -0.1$"):
        TrainConfig.load(None, ["--weight-decay", "-0.1"])


def test_num_workers_is_refused_saying_what_to_do(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("batch_size: 4\nnum_workers: 2\n")
    removed = ("num_workers: removed: the data is read by the training process itself, without loader workers; "
               "delete the key")
    with pytest.raises(ValueError, match=f"^{path}: {removed}$"):
        TrainConfig.load(str(path))
    with pytest.raises(ValueError, match=f"^override --{removed}$"):
        TrainConfig.load(None, ["--num-workers", "2"])


def test_a_boolean_key_alone_is_a_flag():
    assert TrainConfig.load(None, ["--overwrite"]).overwrite is True
    config = TrainConfig.load(None, ["--allow-config-change", "--steps", "3", "--progress", "false"])
    assert (config.allow_config_change, config.steps, config.progress) == (True, 3, False)
    with pytest.raises(ValueError, match="override --seq_len: missing its value"):
        TrainConfig.load(None, ["--seq-len"])


def test_an_override_after_equals_keeps_its_dashes():
    config = TrainConfig.load(None, ["--output-dir=runs/my-run"])
    assert config.output_dir == "runs/my-run"


def test_the_saved_config_leaves_out_how_the_run_was_started(tmp_path):
    config = TrainConfig(overwrite=True, allow_config_change=True, steps=5)
    config.save(str(tmp_path / "config.yaml"))
    assert TrainConfig.load(str(tmp_path / "config.yaml")) == TrainConfig(steps=5)


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_a_tenth():
    config = TrainConfig(lr=1.0, warm_up=10, min_lr_ratio=0.1)
    rates = [learning_rate(step, 110, config) for step in range(110)]
    assert rates[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert rates[10] == pytest.approx(1.0) and rates[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert learning_rate(5, 100, TrainConfig(lr=1.0, warm_up=0.1)) == pytest.approx(0.6)  # FlagAI's fraction


def test_budgets():
    assert total_steps(TrainConfig(), 10**6, None, 8) == 600
    assert total_steps(TrainConfig(train_tokens=8 * 256 * 10 + 1), 10**6, None, 8) == 11
    assert total_steps(TrainConfig(epochs=2), 8 * 256 * 5, None, 8) == 10
    assert total_steps(TrainConfig(epochs=1), 0, 33, 8) == 5  # SFT counts packed rows


def test_no_weight_decay_on_norms():
    from aquila.model.model import Aquila

    model = Aquila(AquilaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=50, multiple_of=16))
    decayed, plain = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] for p in plain["params"]) and plain["weight_decay"] == 0.0
    assert not any("norm" in names[id(p)] for p in decayed["params"]) and decayed["weight_decay"] == 0.1


def test_bmtrain_is_refused_clearly_without_cuda(tmp_path):
    import torch

    from aquila.train.engine import Processes, resolve_engine

    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without CUDA")
    with pytest.raises(ValueError, match="engine bmtrain needs CUDA GPUs and NCCL"):
        resolve_engine("bmtrain", Processes(0, 1, 0, torch.device("cpu")))
    with pytest.raises(ValueError, match="engine single runs one process"):
        resolve_engine("single", Processes(0, 2, 0, torch.device("cpu")))
