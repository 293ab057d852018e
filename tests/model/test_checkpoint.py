"""Checkpoint interop and parity with transformers' LlamaForCausalLM on the same random weights (fp32, CPU)."""

import json

import pytest
import torch

from aquila.model.checkpoint import LAYER_NAMES, hf_name, load, rotate_half_to_interleaved, save_hf
from aquila.model.generate import Sampling, generate

transformers = pytest.importorskip("transformers")


def hf_model(tmp_path, kv_heads=2):
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=kv_heads, intermediate_size=176, vocab_size=97,
                                      max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # larger than the default init, so that errors are not hidden
            parameter.normal_(0.0, 0.3)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    return model


def assert_same_logits(ours, reference, tokens):
    with torch.no_grad():
        expected = reference(tokens).logits
        actual = ours(tokens)
    relative = ((actual - expected).norm() / expected.norm()).item()
    assert relative < 1e-5, f"relative error {relative:.3g}"


def test_hugging_face_checkpoint_matches_transformers(tmp_path):
    reference = hf_model(tmp_path)
    ours = load(str(tmp_path / "hf")).eval()
    tokens = torch.randint(0, 97, (2, 19))
    assert_same_logits(ours, reference, tokens)
    prompt = tokens[:1, :7]
    expected = reference.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, 7:].tolist()
    assert generate(ours, [prompt[0].tolist()], Sampling(max_new_tokens=8)) == [expected]


def test_flagai_checkpoint_with_interleaved_rotary_matches_transformers(tmp_path):
    reference = hf_model(tmp_path, kv_heads=4)  # FlagAI's Aquila has no GQA
    flagai = tmp_path / "flagai"
    flagai.mkdir()
    state = {}
    names = {hf_name(f"layers.{i}.{rest}"): f"layers.{i}.{rest}" for i in range(2) for rest in LAYER_NAMES}
    names.update({hf_name(n): n for n in ("tok_embeddings.weight", "norm.weight", "output.weight")})
    for name, tensor in reference.state_dict().items():
        ours = names[name]
        if ours.endswith(("wq.weight", "wk.weight")):  # FlagAI (Meta) pairs features (2i, 2i+1)
            tensor = rotate_half_to_interleaved(tensor, 4)
        state[ours] = tensor
    torch.save(state, flagai / "pytorch_model.bin")
    (flagai / "config.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 16,
                                                    "norm_eps": 1e-5, "vocab_size": 97, "max_seq_len": 64,
                                                    "initializer_range": 0.02}))
    ours = load(str(flagai)).eval()
    assert ours.config.rope_interleaved
    tokens = torch.randint(0, 97, (2, 13))
    assert_same_logits(ours, reference, tokens)
    # Converted to the Hugging Face layout (rows permuted back), it loads in transformers itself.
    save_hf(ours, str(tmp_path / "converted"), max_shard_bytes=100_000)  # small shards: exercise the index
    assert (tmp_path / "converted" / "model.safetensors.index.json").exists()
    converted = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "converted").eval()
    assert_same_logits(ours, converted, tokens)
    assert_same_logits(load(str(tmp_path / "converted")).eval(), reference, tokens)


def test_mismatched_checkpoints_get_clear_errors(tmp_path):
    hf_model(tmp_path)
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    config["intermediate_size"] = 160
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.\w+.weight' has shape \((176, 64|64, 176)\), "
                                         r"the model's 'layers.0.feed_forward.w\d.weight' needs"):
        load(str(tmp_path / "hf"))
    config["intermediate_size"], config["num_hidden_layers"] = 176, 3
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing \['layers.2"):
        load(str(tmp_path / "hf"))
    config["num_hidden_layers"] = 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.1"):
        load(str(tmp_path / "hf"))


def test_convert_command(tmp_path):
    from aquila.cli import main

    reference = hf_model(tmp_path)
    main(["convert", str(tmp_path / "hf"), str(tmp_path / "bf16"), "--dtype", "bf16"])
    converted = load(str(tmp_path / "bf16"), dtype=torch.bfloat16)
    assert converted.output.weight.dtype == torch.bfloat16
    torch.testing.assert_close(converted.output.weight.float(), reference.lm_head.weight.bfloat16().float())
    with pytest.raises(SystemExit, match="aquila convert: load: no .bin weight files"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text(json.dumps({"dim": 64, "n_heads": 4}))
        main(["convert", str(tmp_path / "empty"), str(tmp_path / "out")])
