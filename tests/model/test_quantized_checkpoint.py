"""Quantized checkpoints (the format in docs/model.md): written by save_hf and `aquila quantize`, loaded by load and
the inference commands, quantization while loading (--quantize), random-weight checkpoints, and the errors on bad
input, each naming the argument or file."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from aquila.cli import main
from aquila.model import checkpoint as checkpoint_module
from aquila.model.checkpoint import (
    checkpoint_tensors,
    load,
    random_tensors,
    rotate_half_to_interleaved,
    save_hf,
    save_random_hf,
)
from aquila.model.config import AquilaConfig
from aquila.model.model import Aquila
from aquila.model.quantize import Quantization, quantize_model

CONFIG = AquilaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_dim=192, max_seq_len=64)


def model(config=CONFIG):
    torch.manual_seed(0)
    return Aquila(config).eval()


@pytest.fixture
def dense(tmp_path):
    """A bf16 Hugging Face checkpoint of random weights (shards of about 60 KB: an index)."""
    save_hf(model().to(torch.bfloat16), str(tmp_path / "dense"), max_shard_bytes=60_000)
    return str(tmp_path / "dense")


def stored_tensors(directory):
    """{name: (safetensors dtype, shape)} and the metadata of every shard of a checkpoint."""
    tensors, metadata = {}, []
    for file in sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")):
        with safe_open(os.path.join(directory, file), framework="pt") as f:
            metadata.append(f.metadata())
            for name in f.keys():  # noqa: SIM118
                part = f.get_slice(name)
                tensors[name] = (part.get_dtype(), tuple(part.get_shape()))
    return tensors, metadata


def same_buffers(a, b):
    named_a, named_b = dict(checkpoint_tensors(a)), dict(checkpoint_tensors(b))
    assert named_a.keys() == named_b.keys()
    for name, tensor in named_a.items():
        assert tensor.dtype == named_b[name].dtype and torch.equal(tensor, named_b[name]), name


@pytest.mark.parametrize("spec", [Quantization(8), Quantization(8, output_bits=None), Quantization(4, 16),
                                  Quantization(4, 32, symmetric=False), Quantization(4, 16, output_bits=4),
                                  Quantization(4, 32, symmetric=False, output_bits=None)],
                         ids=["int8", "int8-dense-output", "int4-g16-sym", "int4-g32-asym", "int4-g16-int4-output",
                              "int4-g32-asym-dense-output"])
def test_the_format_holds_what_docs_model_md_says(tmp_path, spec):
    quantized = quantize_model(model().to(torch.bfloat16), spec.bits, spec.group_size, spec.symmetric,
                               spec.output_bits)
    save_hf(quantized, str(tmp_path / "q"), max_shard_bytes=30_000)
    values = json.loads((tmp_path / "q" / "config.json").read_text())
    assert values["quantization_config"] == {
        "quant_method": "aquila-weight-only", "format_version": 2, "bits": spec.bits, "group_size": spec.group_size,
        "symmetric": spec.symmetric, "output_bits": spec.output_bits}
    tensors, metadata = stored_tensors(tmp_path / "q")
    assert len(metadata) > 1 and (tmp_path / "q" / "model.safetensors.index.json").exists()
    for shard in metadata:
        assert shard == {"format": "pt", "quant_method": "aquila-weight-only", "format_version": "2",
                         "bits": str(spec.bits), "group_size": json.dumps(spec.group_size),
                         "symmetric": json.dumps(spec.symmetric), "output_bits": json.dumps(spec.output_bits)}
    expected = {"model.embed_tokens.weight": ("BF16", (97, 64)), "model.norm.weight": ("BF16", (64,))}
    shapes = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
              "self_attn.o_proj": (64, 64), "mlp.gate_proj": (192, 64), "mlp.up_proj": (192, 64),
              "mlp.down_proj": (64, 192)}
    linears = {f"model.layers.{i}.{name}": shape for i in range(2) for name, shape in shapes.items()}
    linears["lm_head"] = (97, 64)
    for i in range(2):
        expected[f"model.layers.{i}.input_layernorm.weight"] = ("BF16", (64,))
        expected[f"model.layers.{i}.post_attention_layernorm.weight"] = ("BF16", (64,))
    for prefix, (rows, columns) in linears.items():
        bits = spec.output_bits if prefix == "lm_head" else spec.bits
        if bits is None:
            expected["lm_head.weight"] = ("BF16", (rows, columns))
        elif bits == 8:
            expected[f"{prefix}.qweight"] = ("I8", (rows, columns))
            expected[f"{prefix}.scales"] = ("F32", (rows,))
        else:
            groups = columns // spec.group_size
            expected[f"{prefix}.qweight"] = ("U8", (rows, columns // 2))
            expected[f"{prefix}.scales"] = ("F32", (rows, groups))
            if not spec.symmetric:
                expected[f"{prefix}.zeros"] = ("U8", (rows, groups))
    assert tensors == expected
    loaded = load(str(tmp_path / "q"), dtype=torch.bfloat16)
    same_buffers(loaded, quantized)
    tokens = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), quantized(tokens))


@pytest.mark.parametrize("spec", [Quantization(8), Quantization(4, 16, symmetric=False),
                                  Quantization(4, 16, symmetric=False, output_bits=4)],
                         ids=["int8", "int4-g16-asym", "int4-g16-asym-int4-output"])
def test_quantizing_while_loading_equals_quantizing_the_loaded_model(dense, monkeypatch, spec):
    """Chunks of a few rows (each row is quantized on its own) give what quantizing whole tensors gives."""
    monkeypatch.setattr(checkpoint_module, "CHUNK_ELEMENTS", 1000)
    streamed = load(dense, dtype=torch.bfloat16, quantize=spec)
    whole = quantize_model(load(dense, dtype=torch.bfloat16), spec.bits, spec.group_size, spec.symmetric,
                           spec.output_bits)
    same_buffers(streamed, whole)
    # The kept tensors are converted to the dtype asked for.
    as_fp32 = load(dense, quantize=spec)
    assert as_fp32.tok_embeddings.weight.dtype == torch.float32
    assert torch.equal(as_fp32.layers[1].feed_forward.w2.qweight, whole.layers[1].feed_forward.w2.qweight)


def test_flagai_weights_quantize_with_their_rotary_rows_permuted(tmp_path):
    """A FlagAI .bin (interleaved rotary rows) quantized while loading, then saved: the rows of wq/wk's qweight,
    scales and zeros move with the rows of the weight, so the saved checkpoint computes the same logits."""
    flagai = tmp_path / "flagai"
    flagai.mkdir()
    config = AquilaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=97, multiple_of=16, max_seq_len=64)
    reference = model(config)
    state = {}
    for name, tensor in reference.state_dict().items():
        if name.endswith(("wq.weight", "wk.weight")):
            tensor = rotate_half_to_interleaved(tensor, 4)
        state[name] = tensor
    torch.save(state, flagai / "pytorch_model.bin")
    (flagai / "config.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 16,
                                                    "norm_eps": 1e-5, "vocab_size": 97, "max_seq_len": 64}))
    spec = Quantization(4, 16, symmetric=False)
    interleaved = load(str(flagai), quantize=spec)
    assert interleaved.config.rope_interleaved
    save_hf(interleaved, str(tmp_path / "hf"))
    rotate_half = load(str(tmp_path / "hf"))
    assert not rotate_half.config.rope_interleaved
    same_as_hf = quantize_model(model(config), 4, 16, symmetric=False)  # the rotate-half weights quantized directly
    same_buffers(rotate_half, same_as_hf)
    tokens = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(rotate_half(tokens), interleaved(tokens), rtol=1e-5, atol=1e-5)


def rewrite_shard(directory, change):
    """Applies change(tensors, metadata) to the shard holding layer 0's q_proj and writes it back."""
    path = directory / "model.safetensors"
    if not path.exists():
        index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
        path = directory / next(f for name, f in index.items() if name.startswith("model.layers.0.self_attn.q_proj"))
    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        metadata = f.metadata()
    change(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture
def quantized(tmp_path, dense):
    main(["quantize", dense, str(tmp_path / "q"), "--bits", "4", "--group-size", "16", "--asymmetric"])
    return tmp_path / "q"


def set_config(directory, **changes):
    values = json.loads((directory / "config.json").read_text())
    values["quantization_config"].update(changes)
    (directory / "config.json").write_text(json.dumps(values))


def test_a_broken_quantized_checkpoint_is_refused_naming_the_file_and_tensor(quantized):
    name = "model.layers.0.self_attn.q_proj"
    shard = rewrite_shard(quantized, lambda tensors, metadata: tensors.pop(f"{name}.scales"))
    with pytest.raises(ValueError, match=r"load: quantized Hugging Face checkpoint does not match the model: missing "
                                         r"\['layers.0.attention.wq.scales'\], unexpected \[\]"):
        load(str(quantized))
    rewrite_shard(quantized, lambda tensors, metadata: tensors.update({f"{name}.scales": torch.ones(64, 4).half()}))
    with pytest.raises(ValueError, match=rf"load: {shard}: tensor '{name}.scales' is torch.float16; the format stores "
                                         r"it as torch.float32"):
        load(str(quantized))
    rewrite_shard(quantized, lambda tensors, metadata: tensors.update({f"{name}.scales": torch.ones(64, 2)}))
    with pytest.raises(ValueError, match=rf"tensor '{name}.scales' has shape \(64, 2\), the model's "
                                         r"'layers.0.attention.wq.scales' needs \(64, 4\)"):
        load(str(quantized))
    rewrite_shard(quantized, lambda tensors, metadata: tensors.update(
        {f"{name}.scales": torch.full((64, 4), float("nan"))}))
    with pytest.raises(ValueError, match=rf"{shard}: tensor '{name}.scales' has negative, NaN or infinite scales"):
        load(str(quantized))
    rewrite_shard(quantized, lambda tensors, metadata: tensors.update(
        {f"{name}.scales": torch.ones(64, 4), f"{name}.zeros": torch.full((64, 4), 16, dtype=torch.uint8)}))
    with pytest.raises(ValueError, match=rf"{shard}: tensor '{name}.zeros' has zero points above 15"):
        load(str(quantized))
    rewrite_shard(quantized, lambda tensors, metadata: tensors.update(
        {f"{name}.zeros": torch.zeros(64, 4, dtype=torch.uint8), f"{name}.weight": torch.zeros(64, 64)}))
    with pytest.raises(ValueError, match=rf"missing \[\], unexpected \['{name}.weight'\]"):
        load(str(quantized))
    rewrite_shard(quantized, lambda tensors, metadata: (tensors.pop(f"{name}.weight"),
                                                        metadata.update(format_version="1")))
    with pytest.raises(ValueError, match=rf"^{shard}: the shard's metadata names format 'aquila-weight-only' version "
                                         r"'1'; config.json says 'aquila-weight-only' version 2$"):
        load(str(quantized))
    rewrite_shard(quantized, lambda tensors, metadata: metadata.update(format_version="2", group_size="32"))
    with pytest.raises(ValueError, match=rf"^{shard}: the shard's metadata differs from config.json's "
                                         r"quantization_config in group_size$"):
        load(str(quantized))
    rewrite_shard(quantized, lambda tensors, metadata: metadata.update(group_size="16", output_bits="null"))
    with pytest.raises(ValueError, match=rf"^{shard}: the shard's metadata differs from config.json's "
                                         r"quantization_config in output_bits$"):
        load(str(quantized))
    rewrite_shard(quantized, lambda tensors, metadata: metadata.update(output_bits="8"))
    load(str(quantized))  # repaired


def test_a_quantized_config_is_checked_before_any_tensor(quantized):
    path = quantized / "config.json"
    original = path.read_text()
    set_config(quantized, format_version=3)
    with pytest.raises(ValueError, match=rf"^{path}: aquila-weight-only format version 3 is unknown; this aquila "
                                         r"reads versions 1 and 2$"):
        load(str(quantized))
    set_config(quantized, format_version=2, output_bits=5)
    with pytest.raises(ValueError, match=rf"^{path}: quantization_config: Quantization: output_bits must be 8, 4 or "
                                         r"None \(kept in the model's dtype\), got 5$"):
        load(str(quantized))
    set_config(quantized, output_bits=8, quant_method="gptq")
    with pytest.raises(ValueError, match=rf"^{path}: quantization_config's quant_method 'gptq' is not a format aquila "
                                         r"reads \(it reads 'aquila-weight-only'\)$"):
        load(str(quantized))
    set_config(quantized, quant_method="aquila-weight-only", group_size=3)
    with pytest.raises(ValueError, match=rf"^{path}: quantization_config: Quantization: group_size must be an even "
                                         r"int >= 2, got 3$"):
        load(str(quantized))
    set_config(quantized, group_size=24)
    with pytest.raises(ValueError, match=r"^quantize_model: layer 'layers.0.attention.wq' has 64 input features, not "
                                         r"a multiple of group_size 24$"):
        load(str(quantized))
    values = json.loads(original)
    del values["quantization_config"]["symmetric"]
    values["quantization_config"]["extra"] = 1
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError, match=rf"^{path}: quantization_config has unknown keys \['extra'\] and lacks "
                                         r"\['symmetric'\]; version 2 takes"):
        load(str(quantized))
    del values["quantization_config"]
    path.write_text(json.dumps(values))
    shard = sorted(quantized.glob("*.safetensors"))[0]
    with pytest.raises(ValueError, match=rf"^{shard}: the shard is quantized \(aquila-weight-only\) but config.json "
                                         r"has no quantization_config$"):
        load(str(quantized))
    path.write_text(original)
    with pytest.raises(ValueError, match=r"holds a checkpoint quantized as int4 g16 asym, output int8; it cannot be "
                                         r"loaded as int8, output int8: load it without quantize= \(--quantize\), as "
                                         r"it is stored, or quantize the original weights$"):
        load(str(quantized), quantize=Quantization(8))
    with pytest.raises(ValueError, match=r"quantized as int4 g16 asym, output int8; it cannot be loaded as int4 g16 "
                                         r"asym, output dense"):
        load(str(quantized), quantize=Quantization(4, 16, symmetric=False, output_bits=None))
    same_buffers(load(str(quantized), quantize=Quantization(4, 16, symmetric=False)), load(str(quantized)))


@pytest.mark.parametrize("output_bits, quantized_output", [(None, False), (4, True)], ids=["kept", "quantized"])
def test_version_1_checkpoints_still_load(tmp_path, output_bits, quantized_output):
    """Version 1 said quantized_output (the output as the blocks, or dense) where version 2 says output_bits."""
    directory = tmp_path / "v1"
    original = quantize_model(model().to(torch.bfloat16), 4, 16, symmetric=False, output_bits=output_bits)
    save_hf(original, str(directory))
    v1 = {"quant_method": "aquila-weight-only", "format_version": 1, "bits": 4, "group_size": 16, "symmetric": False,
          "quantized_output": quantized_output}
    values = json.loads((directory / "config.json").read_text())
    values["quantization_config"] = v1
    (directory / "config.json").write_text(json.dumps(values))
    as_strings = {key: value if isinstance(value, str) else json.dumps(value) for key, value in v1.items()}
    rewrite_shard(directory, lambda tensors, metadata: (metadata.clear(), metadata.update(format="pt", **as_strings)))
    loaded = load(str(directory), dtype=torch.bfloat16)
    same_buffers(loaded, original)
    assert checkpoint_module.checkpoint_quantization(str(directory)) == Quantization(4, 16, False, output_bits)
    set_config(directory, quantized_output=1)
    with pytest.raises(ValueError, match=r"config.json: quantization_config's quantized_output must be a bool$"):
        load(str(directory))
    set_config(directory, quantized_output=quantized_output, output_bits=8)
    with pytest.raises(ValueError, match=r"quantization_config has unknown keys \['output_bits'\] and lacks \[\]; "
                                         r"version 1 takes"):
        load(str(directory))


def test_a_tied_output_stays_dense_whatever_the_request(tmp_path):
    """An output projection that shares the embedding table is never quantized, so quantizing while loading with the
    default int8 output, saving, and loading the saved checkpoint with that same request all agree."""
    config = AquilaConfig(dim=64, n_layers=1, n_heads=4, vocab_size=97, ffn_dim=192, tie_embeddings=True)
    save_hf(model(config), str(tmp_path / "tied"))
    loaded = load(str(tmp_path / "tied"), quantize=Quantization(8))
    assert loaded.output.weight is loaded.tok_embeddings.weight
    save_hf(loaded, str(tmp_path / "tied-int8"))
    assert checkpoint_module.checkpoint_quantization(str(tmp_path / "tied-int8")) == Quantization(8, output_bits=None)
    same_buffers(load(str(tmp_path / "tied-int8"), quantize=Quantization(8)), loaded)


# --- The commands -----------------------------------------------------------------------------------------------------


def fails_with(argv, message):
    """main(argv) exits with exactly `message` (one line)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == message


@pytest.fixture
def served(tmp_path, small_tokenizer):
    """A bf16 checkpoint with its tokenizer, for the inference commands."""
    config = AquilaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=small_tokenizer.vocab_size, ffn_dim=192,
                          max_seq_len=256)
    directory = tmp_path / "served"
    save_hf(model(config).to(torch.bfloat16), str(directory))
    small_tokenizer.save(str(directory))
    return directory


def test_quantize_command_writes_a_checkpoint_that_generate_loads(served, tmp_path, small_tokenizer, capsys):
    from aquila.model.generate import Sampling, generate_text

    dest = tmp_path / "int4"
    main(["quantize", str(served), str(dest), "--bits", "4", "--group-size", "32"])
    assert capsys.readouterr().out.startswith(f"{served} -> {dest} (int4 g32 sym, output int8, unquantized tensors "
                                              "in bf16, ")
    expected = quantize_model(load(str(served), dtype=torch.bfloat16), 4, 32)
    same_buffers(load(str(dest), dtype=torch.bfloat16), expected)
    small_tokenizer.save(str(dest))
    main(["generate", "--checkpoint", str(dest), "床前明月光，", "--device", "cpu", "--max-new-tokens", "6",
          "--temperature", "0", "--no-echo"])
    ids = small_tokenizer.encode("床前明月光，", bos=True)
    sampling = Sampling(max_new_tokens=6, repetition_penalty=1.1, top_k=50, top_p=0.9,
                        stop_tokens=(small_tokenizer.eos_id,))
    text = generate_text(load(str(dest)).eval(), small_tokenizer, [ids], sampling)[0]
    assert capsys.readouterr().out == text + "\n"
    # Quantizing while loading gives the same model, so the same text.
    main(["generate", "--checkpoint", str(served), "床前明月光，", "--device", "cpu", "--max-new-tokens", "6",
          "--temperature", "0", "--no-echo", "--quantize", "int4", "--group-size", "32"])
    assert capsys.readouterr().out == text + "\n"


@pytest.mark.parametrize("form, output_bits", [("dense", None), ("int4", 4), ("int8", 8)])
def test_output_projection_option(served, tmp_path, capsys, form, output_bits):
    dest = tmp_path / form
    main(["quantize", str(served), str(dest), "--bits", "4", "--group-size", "32", "--output-projection", form])
    assert f"(int4 g32 sym, output {form}, " in capsys.readouterr().out
    expected = quantize_model(load(str(served), dtype=torch.bfloat16), 4, 32, output_bits=output_bits)
    same_buffers(load(str(dest), dtype=torch.bfloat16), expected)
    assert checkpoint_module.checkpoint_quantization(str(dest)) == Quantization(4, 32, output_bits=output_bits)
    arguments = ["generate", "--checkpoint", str(served), "hi", "--device", "cpu", "--max-new-tokens", "3",
                 "--temperature", "0", "--no-echo", "--tokenizer", str(served), "--dtype", "bf16"]
    main([*arguments, "--quantize", "int4", "--group-size", "32", "--output-projection", form])
    on_the_fly = capsys.readouterr().out
    main([*arguments[:2], str(dest), *arguments[3:]])
    assert capsys.readouterr().out == on_the_fly


def test_chat_and_generate_quantize_while_loading(served, monkeypatch, capsys):
    import io
    import sys

    main(["generate", "--checkpoint", str(served), "hello", "--device", "cpu", "--max-new-tokens", "4",
          "--quantize", "int8", "--seed", "0"])
    assert capsys.readouterr().out.startswith("hello")
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n"))
    main(["chat", "--checkpoint", str(served), "--device", "cpu", "--max-new-tokens", "4", "--quantize", "int4",
          "--group-size", "16", "--asymmetric", "--dtype", "bf16"])
    assert capsys.readouterr().out.startswith("Aquila:")


def test_the_commands_refuse_bad_quantization_arguments(served, tmp_path, capsys):
    generate = ["generate", "--checkpoint", str(served), "hi", "--device", "cpu"]
    fails_with([*generate, "--output-projection", "int8"],
               "aquila generate: --output-projection describes a quantized model; add --quantize int8 or int4")
    fails_with([*generate, "--quantize", "int8", "--output-projection", "int4"],
               "aquila generate: --output-projection int4 quantizes the output projection as the int4 blocks; int8 "
               "blocks take int8 or dense")
    fails_with([*generate, "--quantize", "int4", "--group-size", "128"],
               "aquila generate: quantize_model: layer 'layers.0.attention.wq' has 64 input features, not a multiple "
               "of group_size 128")
    fails_with([*generate, "--quantize", "int8", "--group-size", "16"],
               "aquila generate: --group-size and --asymmetric apply to int4 only: int8 is symmetric, one scale per "
               "output channel")
    fails_with([*generate, "--group-size", "16"],
               "aquila generate: --group-size and --asymmetric describe int4 quantization; add --quantize int4")
    fails_with([*generate, "--quantize", "int4", "--group-size", "7"],
               "aquila generate: --group-size must be an even number >= 2, got 7")
    with pytest.raises(SystemExit) as exit_info:
        main([*generate, "--quantize", "int3"])
    assert exit_info.value.code == 2
    assert "argument --quantize: invalid choice: 'int3'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", str(served), str(tmp_path / "q"), "--bits", "3"])
    assert exit_info.value.code == 2
    assert "argument --bits: invalid choice: 3 (choose from 4, 8)" in capsys.readouterr().err
    fails_with(["quantize", str(served), str(tmp_path / "q"), "--bits", "8", "--asymmetric"],
               "aquila quantize: --group-size and --asymmetric apply to int4 only: int8 is symmetric, one scale per "
               "output channel")
    fails_with(["quantize", str(served), str(served), "--bits", "8"],
               f"aquila quantize: SOURCE and DEST are the same directory ({served}); quantize into a new directory")
    assert not (tmp_path / "q").exists()


def test_quantize_never_overwrites_without_overwrite(served, tmp_path):
    dest = tmp_path / "dest"
    main(["quantize", str(served), str(dest), "--bits", "8"])
    before = (dest / "model.safetensors").read_bytes()
    fails_with(["quantize", str(served), str(dest), "--bits", "4", "--group-size", "16"],
               f"aquila quantize: {dest} exists and is not empty; choose a new directory, or replace the checkpoint "
               "in it with --overwrite")
    assert (dest / "model.safetensors").read_bytes() == before
    main(["quantize", str(served), str(dest), "--bits", "4", "--group-size", "16", "--overwrite"])
    assert load(str(dest)).layers[0].attention.wq.bits == 4
    fails_with(["quantize", str(dest), str(tmp_path / "again"), "--bits", "8"],
               f"aquila quantize: {dest} is already quantized (int4 g16 sym, output int8); quantize the original "
               "weights")
    (dest / "notes.txt").write_text("mine")
    fails_with(["quantize", str(served), str(dest), "--bits", "8", "--overwrite"],
               f"aquila quantize: {dest} holds files that are not a checkpoint's config.json or safetensors "
               "(notes.txt); they would be lost, so it is not replaced")
    assert (dest / "notes.txt").read_text() == "mine"


def test_random_checkpoint_command(tmp_path, capsys):
    dest = tmp_path / "random"
    main(["random-checkpoint", "--preset", "demo", str(dest), "--seed", "3"])
    config = AquilaConfig.preset("demo")
    assert capsys.readouterr().out == (f"{dest}: random demo weights, seed 3, bf16, {config.num_parameters():,} "
                                       "parameters\n")
    loaded = load(str(dest), dtype=torch.bfloat16)
    shape = ("dim", "n_layers", "n_heads", "kv_heads", "vocab_size", "hidden_dim", "max_seq_len", "norm_eps")
    assert [getattr(loaded.config, name) for name in shape] == [getattr(config, name) for name in shape]
    weights = dict(loaded.named_parameters())
    with torch.device("meta"):
        assert weights.keys() == dict(Aquila(config).named_parameters()).keys()
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    embeddings = weights["tok_embeddings.weight"].float()
    assert abs(embeddings.std().item() - config.initializer_range) < 1e-3 and abs(embeddings.mean().item()) < 1e-3
    assert (weights["layers.3.ffn_norm.weight"] == 1).all()
    # The same seed, the same bytes; another seed, other weights.
    save_random_hf(config, str(tmp_path / "again"), seed=3)
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (dest / "model.safetensors").read_bytes()
    other = dict(random_tensors(config, seed=4))
    assert not torch.equal(other["tok_embeddings.weight"], weights["tok_embeddings.weight"])
    fails_with(["random-checkpoint", "--preset", "demo", str(dest)],
               f"aquila random-checkpoint: {dest} exists and is not empty; choose a new directory, or replace the "
               "checkpoint in it with --overwrite")
    main(["random-checkpoint", "--preset", "demo", str(dest), "--seed", "4", "--overwrite"])
    assert torch.equal(load(str(dest), dtype=torch.bfloat16).tok_embeddings.weight, other["tok_embeddings.weight"])


def test_random_checkpoint_names_a_bad_config_file(tmp_path):
    shape = tmp_path / "shape.json"
    shape.write_text(json.dumps({"dim": 64, "n_heads": 4, "layers": 2}))
    fails_with(["random-checkpoint", "--config", str(shape), str(tmp_path / "r")],
               f"aquila random-checkpoint: {shape}: AquilaConfig: unknown keys ['layers']; the known ones are "
               f"{sorted(AquilaConfig.__dataclass_fields__)}")
    shape.write_text("{")
    fails_with(["random-checkpoint", "--config", str(shape), str(tmp_path / "r")],
               f"aquila random-checkpoint: {shape}: invalid JSON (Expecting property name enclosed in double quotes at "
               "line 1, column 2)")
    assert not (tmp_path / "r").exists()


def test_random_checkpoint_of_a_config_file_in_shards(tmp_path):
    config = AquilaConfig(dim=32, n_layers=3, n_heads=2, vocab_size=50, multiple_of=16, tie_embeddings=True)
    config.save(str(tmp_path / "shape.json"))
    main(["random-checkpoint", "--config", str(tmp_path / "shape.json"), str(tmp_path / "r"), "--dtype", "fp32"])
    loaded = load(str(tmp_path / "r"))
    assert loaded.output.weight is loaded.tok_embeddings.weight
    tensors, _ = stored_tensors(tmp_path / "r")
    assert "lm_head.weight" not in tensors and all(dtype == "F32" for dtype, _ in tensors.values())
    save_random_hf(config, str(tmp_path / "sharded"), dtype=torch.float32, max_shard_bytes=4_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(index.values()))
    assert len(files) > 3 and files[-1] == f"model-{len(files):05d}-of-{len(files):05d}.safetensors"
    assert sorted(os.listdir(tmp_path / "sharded")) == sorted(files + ["config.json", "model.safetensors.index.json"])
    same_buffers(load(str(tmp_path / "sharded")), load(str(tmp_path / "r")))  # seed 0 both
