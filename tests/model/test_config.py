import pytest

from aquila.model.config import PRESETS, AquilaConfig


def test_aquila_7b_shape_and_parameter_count():
    config = AquilaConfig.preset("aquila-7b")
    assert (config.dim, config.n_layers, config.n_heads, config.hidden_dim) == (4096, 32, 32, 11008)
    assert config.num_parameters() == 7_295_537_152


def test_every_preset_is_valid_and_the_small_ones_are_small():
    for name in PRESETS:
        AquilaConfig.preset(name)
    assert 90e6 <= AquilaConfig.preset("aquila-100m").num_parameters() <= 110e6
    assert AquilaConfig.preset("demo").num_parameters() < 10e6


def test_gqa_and_tied_embeddings_change_the_count():
    base = AquilaConfig(dim=64, n_layers=2, n_heads=8, vocab_size=100, multiple_of=16)
    gqa = AquilaConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=100, multiple_of=16)
    tied = AquilaConfig(dim=64, n_layers=2, n_heads=8, vocab_size=100, multiple_of=16, tie_embeddings=True)
    # wk and wv shrink from 64x64 to 64x16 in each of the two layers; one embedding table goes.
    assert base.num_parameters() - gqa.num_parameters() == 2 * 2 * 64 * (64 - 16)
    assert base.num_parameters() - tied.num_parameters() == 100 * 64


def test_json_round_trip(tmp_path):
    config = AquilaConfig.preset("demo")
    path = tmp_path / "config.json"
    config.save(path)
    assert AquilaConfig.from_json(path) == config
    assert not (tmp_path / "config.json.tmp").exists()


def test_flagai_config_json_loads():
    flagai = {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "norm_eps": 1e-5,
              "vocab_size": 100008, "max_seq_len": 2048, "initializer_range": 0.02}
    assert AquilaConfig.from_dict(flagai).num_parameters() == 7_295_537_152


@pytest.mark.parametrize("values, words", [
    ({"dim": 64, "n_heads": 4, "n_layer": 2}, r"unknown keys \['n_layer'\]"),
    ({"dim": 65, "n_heads": 4}, r"dim \(65\) must be a multiple of n_heads \(4\)"),
    ({"dim": 64, "n_heads": 8, "n_kv_heads": 3}, r"must be a multiple of n_kv_heads \(3\)"),
    ({"dim": 0}, "dim must be a positive int"),
    ({"dim": 64, "n_heads": 4, "norm_eps": 0.0}, "must be > 0"),
])
def test_bad_config_gets_a_clear_error(values, words):
    with pytest.raises(ValueError, match=words):
        AquilaConfig.from_dict(values)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'aquila-8b'"):
        AquilaConfig.preset("aquila-8b")
