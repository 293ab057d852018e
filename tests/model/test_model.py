import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from aquila.model import native_decode
from aquila.model.config import AquilaConfig
from aquila.model.model import Aquila

TINY = AquilaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=64)


def test_aquila_7b_builds_on_meta_with_the_published_parameter_count():
    with torch.device("meta"):
        model = Aquila(AquilaConfig.preset("aquila-7b"))
    assert sum(p.numel() for p in model.parameters()) == 7_295_537_152


def test_fused_kernels_match_the_reference_ops():
    """The same weights through the CPU kernels and through the pure-torch references: loss and gradients agree."""
    torch.manual_seed(0)
    fused = Aquila(TINY)
    reference = Aquila(TINY, backend="torch")
    reference.load_state_dict(fused.state_dict())
    tokens = torch.randint(0, TINY.vocab_size, (2, 23))
    targets = torch.randint(0, TINY.vocab_size, (2, 23))
    targets[0, :5] = -100
    losses = []
    for model in (fused, reference):
        loss = model(tokens, targets)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_logits_and_loss_agree():
    torch.manual_seed(0)
    model = Aquila(TINY)
    tokens = torch.randint(0, TINY.vocab_size, (2, 11))
    targets = torch.randint(0, TINY.vocab_size, (2, 11))
    logits = model(tokens)
    assert logits.shape == (2, 11, TINY.vocab_size)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, TINY.vocab_size), targets.reshape(-1))
    torch.testing.assert_close(model(tokens, targets), expected, rtol=1e-5, atol=1e-6)


def test_packed_documents_see_only_themselves():
    """Two documents packed into one row (positions restarting, cu_seqlens at the boundary) give the logits each
    document gets alone."""
    torch.manual_seed(0)
    model = Aquila(TINY)
    first, second = torch.randint(0, TINY.vocab_size, (1, 9)), torch.randint(0, TINY.vocab_size, (1, 14))
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(9), torch.arange(14)])
    cu_seqlens = torch.tensor([0, 9, 23], dtype=torch.int32)
    logits = model(packed, positions=positions, cu_seqlens=cu_seqlens)
    torch.testing.assert_close(logits[:, :9], model(first), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[:, 9:], model(second), rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = Aquila(TINY)
    checkpointed = Aquila(TINY, activation_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, TINY.vocab_size, (2, 15))
    for model in (plain, checkpointed):
        model(tokens, tokens).backward()
    for p, q in zip(plain.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_decoding_with_the_kv_cache_matches_the_full_forward():
    """A prompt through the cache, then one token at a time: the same logits as the whole sequence at once."""
    from aquila.model.model import KVCache

    torch.manual_seed(0)
    model = Aquila(TINY).eval()
    tokens = torch.randint(0, TINY.vocab_size, (2, 16))
    expected = model(tokens)
    cache = KVCache(TINY, batch=2, max_len=32)
    steps = [model.forward_with_cache(tokens[:, :10], cache)]
    for t in range(10, 16):
        steps.append(model.forward_with_cache(tokens[:, t:t + 1], cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-4, atol=1e-5)
    assert cache.lengths.tolist() == [16, 16]


def test_cache_sequences_of_different_lengths():
    """Two sequences at different lengths in one cache (prefilled one at a time through views of it): each decoding
    step gives the logits of each sequence alone; last_only gives the last position's."""
    from aquila.model.model import KVCache

    torch.manual_seed(0)
    model = Aquila(TINY).eval()
    prompts = [torch.randint(0, TINY.vocab_size, (1, n)) for n in (4, 9)]
    cache = KVCache(TINY, batch=2, max_len=16)
    for row, prompt in enumerate(prompts):
        last = model.forward_with_cache(prompt, cache.sequence(row), last_only=True)
        torch.testing.assert_close(last, model(prompt)[:, -1:], rtol=1e-4, atol=1e-5)
    assert cache.lengths.tolist() == [4, 9]
    for _ in range(3):
        following = torch.randint(0, TINY.vocab_size, (2, 1))
        step = model.forward_with_cache(following, cache)
        for row in range(2):
            prompts[row] = torch.cat([prompts[row], following[row:row + 1]], dim=1)
            torch.testing.assert_close(step[row], model(prompts[row])[0, -1:], rtol=1e-4, atol=1e-5)
    assert cache.lengths.tolist() == [7, 12]


# Widths that are no multiple of any vector width (36, 12, 50): every projection runs its vector tails.
ODD = AquilaConfig(dim=36, n_layers=2, n_heads=3, n_kv_heads=1, ffn_dim=50, vocab_size=97, max_seq_len=64)


@pytest.mark.parametrize("config", [TINY, dataclasses.replace(TINY, n_kv_heads=None, rope_interleaved=True,
                                                               tie_embeddings=True), ODD],
                         ids=["gqa", "interleaved-tied", "odd-widths"])
def test_native_decoding_step_matches_the_module_path(config):
    """The one-call C++ decoding step (fp32 CPU) gives the logits and cache of the module-by-module path, for
    sequences at different lengths."""
    from aquila.model.model import KVCache

    torch.manual_seed(0)
    model = Aquila(config).eval()
    prompts = torch.randint(0, config.vocab_size, (3, 6))
    native, modules = KVCache(config, batch=3, max_len=16), KVCache(config, batch=3, max_len=16)
    with torch.no_grad():
        for cache in (native, modules):
            model.forward_with_cache(prompts, cache)
            cache.lengths[1] = 2  # a shorter sequence: its later positions are overwritten
        for _ in range(4):
            token = torch.randint(0, config.vocab_size, (3, 1))
            assert native_decode.decoder(model, native) is not None
            fast = model.forward_with_cache(token, native, last_only=True)
            slow = model.forward_with_cache(token, modules)  # last_only=False: the module path
            torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(native.k, modules.k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(native.v, modules.v, rtol=1e-5, atol=1e-6)
    assert native.lengths.tolist() == modules.lengths.tolist() == [10, 6, 10]
    assert native_decode.decoder(Aquila(config, backend="torch"), native) is None  # the reference stays


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_native_decoding_step_on_narrower_isas(isa):
    """The decoding step is compiled once per ISA; this machine may run AVX-512, so force each narrower one in a
    fresh process (the choice is made once per process) and rerun the fp32 and bf16 comparisons there."""
    tests = [f"{__file__}::{name}" for name in ("test_native_decoding_step_matches_the_module_path",
                                               "test_the_native_step_decodes_bf16_weights_closer_to_fp32_than_the_bf16_modules")]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                            env={**os.environ, "AQUILA_CPU_ISA": isa}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "4 passed" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("config", [TINY, ODD], ids=["gqa", "odd-widths"])
def test_every_prefetch_distance_gives_the_same_logits(config):
    """A prefetch only moves data into cache: each distance (none, the candidates, one past every row's end) gives
    bit-identical logits and caches."""
    from aquila.model.model import KVCache

    torch.manual_seed(0)
    model = Aquila(config).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 4))
    outcomes = []
    for distance in (0, *native_decode.PREFETCH_CANDIDATES, 1 << 20):
        cache = KVCache(config, batch=2, max_len=8)
        step = native_decode.decoder(model, cache, prefetch_bytes=distance)
        assert step.prefetch == (distance, "argument")
        outcomes.append((torch.cat([step(tokens[:, i:i + 1]) for i in range(4)], 1), cache.k, cache.v))
    for logits, k, v in outcomes[1:]:
        assert torch.equal(logits, outcomes[0][0]) and torch.equal(k, outcomes[0][1]) and torch.equal(v, outcomes[0][2])
    with pytest.raises(ValueError, match="prefetch_bytes must be >= 0"):
        native_decode.decoder(model, KVCache(config, batch=2, max_len=8), prefetch_bytes=-1)


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    """A fresh process's view of the prefetch choice: no choice made yet, the cache directory empty, the environment
    variable unset, TINY's weights counted as larger than the CPU's cache (so that they are tuned), and a record of the
    distance each C++ step gets."""
    monkeypatch.setenv("AQUILA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(native_decode.PREFETCH_ENV, raising=False)
    monkeypatch.setattr(native_decode, "_choices", {})
    monkeypatch.setattr(native_decode, "private_cache_bytes", lambda: 0)
    distances = []
    run = native_decode._backend.cpu_extension.decode_step

    def recording(arguments, threads):
        distances.append(arguments["prefetch_bytes"])
        return run(arguments, threads)

    monkeypatch.setattr(native_decode._backend.cpu_extension, "decode_step", recording)
    return tmp_path / native_decode.TUNING_FILE, distances


def test_the_prefetch_distance_is_tuned_once_per_host_saved_and_used(tuning, monkeypatch):
    from aquila.model.model import KVCache

    path, distances = tuning
    model = Aquila(TINY).eval()
    step = model.decoder(KVCache(TINY, batch=1, max_len=8))
    choice, source = step.prefetch
    assert source == "tuned" and choice in native_decode.PREFETCH_CANDIDATES
    # Each candidate warmed once, then timed TUNING_ROUNDS times.
    assert sorted(set(distances)) == sorted(native_decode.PREFETCH_CANDIDATES)
    assert len(distances) == len(native_decode.PREFETCH_CANDIDATES) * (1 + native_decode.TUNING_ROUNDS)
    saved = json.loads(path.read_text())[native_decode.host_key()]
    assert saved["prefetch_bytes"] == choice
    assert set(saved["median_ms"]) == {str(c) for c in native_decode.PREFETCH_CANDIDATES}

    distances.clear()
    step(torch.ones(1, 1, dtype=torch.long))
    assert distances == [choice]  # the step runs with the choice

    # Another process reads the file instead of tuning: a saved choice other than the tuned one shows which is used.
    other = next(c for c in native_decode.PREFETCH_CANDIDATES if c != choice)
    size = native_decode.weight_bytes_per_step(model)
    path.write_text(json.dumps({native_decode.host_key(): {"prefetch_bytes": other, "weight_bytes": size}}))
    monkeypatch.setattr(native_decode, "_choices", {})
    distances.clear()
    cache = KVCache(TINY, batch=1, max_len=8)
    model.forward_with_cache(torch.ones(1, 1, dtype=torch.long), cache, last_only=True)
    assert distances == [other]
    assert model.decoder(cache).prefetch == (other, "cache file")


def test_steps_with_bf16_inputs_are_tuned_apart(tuning):
    """Their loop consumes the weights at another pace: a choice saved for the fp32-input loop is not theirs (nor
    one for quantized projections: see tuning_key)."""
    from aquila.model.model import KVCache

    path, _ = tuning
    model = Aquila(TINY).eval().to(torch.bfloat16)
    widened = native_decode.decoder(model, KVCache(TINY, 1, 8, dtype=torch.bfloat16), bf16_inputs=False)
    rounded = native_decode.decoder(model, KVCache(TINY, 1, 8, dtype=torch.bfloat16), bf16_inputs=True)
    assert widened.prefetch[1] == rounded.prefetch[1] == "tuned"
    saved = json.loads(path.read_text())
    assert set(saved) == {native_decode.host_key(), native_decode.host_key() + " | dense, bf16 inputs"}
    assert saved[native_decode.tuning_key(model, True)]["prefetch_bytes"] == rounded.prefetch[0]
    from aquila.model.quantize import quantize_model

    quantized = quantize_model(Aquila(TINY).eval(), 4, 16).to(torch.bfloat16)
    assert native_decode.tuning_key(quantized, True) == native_decode.host_key() + " | int4"
    assert native_decode.tuning_key(quantized, True, True) == native_decode.host_key() + " | int4, int8 inputs"


def test_steps_with_int8_inputs_are_tuned_apart(tuning):
    """Their vpdpbusd loops consume the weights at another pace than the fp32-input ones."""
    from aquila.model.model import KVCache
    from aquila.model.quantize import quantize_model

    path, _ = tuning
    model = quantize_model(Aquila(TINY).eval(), 8)
    fp32_inputs = native_decode.decoder(model, KVCache(TINY, 1, 8), int8_inputs=False)
    int8_inputs = native_decode.decoder(model, KVCache(TINY, 1, 8), int8_inputs=True)
    assert fp32_inputs.prefetch[1] == int8_inputs.prefetch[1] == "tuned"
    saved = json.loads(path.read_text())
    assert set(saved) == {native_decode.host_key() + " | int8", native_decode.host_key() + " | int8, int8 inputs"}
    assert saved[native_decode.tuning_key(model, False, True)]["prefetch_bytes"] == int8_inputs.prefetch[0]


@pytest.mark.parametrize("content", ["{not json", '{"other host": {"prefetch_bytes": 0, "weight_bytes": SIZE}}',
                                     '{"HOST": {}}', '{"HOST": {"prefetch_bytes": -5, "weight_bytes": SIZE}}',
                                     '{"HOST": {"prefetch_bytes": 0}}', '{"HOST": {"prefetch_bytes": 0, '
                                     '"weight_bytes": "many"}}', "[]"])
def test_an_unusable_tuning_file_is_tuned_again_and_rewritten(tuning, content):
    from aquila.model.model import KVCache

    path, _ = tuning
    model = Aquila(TINY).eval()
    size = native_decode.weight_bytes_per_step(model)
    path.write_text(content.replace("HOST", native_decode.host_key()).replace("SIZE", str(size)))
    step = model.decoder(KVCache(TINY, batch=1, max_len=8))
    assert step.prefetch[1] == "tuned"
    assert json.loads(path.read_text())[native_decode.host_key()]["prefetch_bytes"] == step.prefetch[0]


@pytest.mark.parametrize("ratio, reused", [(3, True), (1 / 3, True), (5, False), (1 / 5, False)])
def test_a_choice_tuned_on_a_model_of_another_size_is_tuned_again(tuning, monkeypatch, ratio, reused):
    """A saved choice holds for models within TUNING_SIZE_FACTOR of the size it was tuned on; beyond it the step is
    tuned again and the file's entry replaced. The same holds for the choice a process keeps."""
    from aquila.model.model import KVCache

    path, _ = tuning
    model = Aquila(TINY).eval()
    size = native_decode.weight_bytes_per_step(model)
    saved = {"prefetch_bytes": 3000, "weight_bytes": int(size * ratio)}  # 3000: no candidate, so it shows
    path.write_text(json.dumps({native_decode.host_key(): saved}))
    step = model.decoder(KVCache(TINY, batch=1, max_len=8))
    entry = json.loads(path.read_text())[native_decode.host_key()]
    if reused:
        assert step.prefetch == (3000, "cache file") and entry == saved
    else:
        assert step.prefetch[1] == "tuned" and step.prefetch[0] in native_decode.PREFETCH_CANDIDATES
        assert entry["prefetch_bytes"] == step.prefetch[0] and entry["weight_bytes"] == size
    # In the same process, a model of another size than the kept choice's is not given it either.
    larger = 5 * entry["weight_bytes"]
    monkeypatch.setattr(native_decode, "weight_bytes_per_step", lambda model: larger)
    assert model.decoder(KVCache(TINY, batch=1, max_len=8)).prefetch[1] == "tuned"
    assert json.loads(path.read_text())[native_decode.host_key()]["weight_bytes"] == larger


def test_the_environment_forces_a_prefetch_distance_and_nothing_is_tuned(tuning, monkeypatch):
    from aquila.model.model import KVCache

    path, distances = tuning
    monkeypatch.setenv(native_decode.PREFETCH_ENV, "4096")
    step = Aquila(TINY).eval().decoder(KVCache(TINY, batch=1, max_len=8))
    assert step.prefetch == (4096, "env")
    step(torch.ones(1, 1, dtype=torch.long))
    assert distances == [4096] and not path.exists()
    for bad in ("-1", "8k"):
        monkeypatch.setenv(native_decode.PREFETCH_ENV, bad)
        with pytest.raises(ValueError, match=f"PREFETCH must be a whole number of bytes >= 0, got '{bad}'"):
            Aquila(TINY).eval().decoder(KVCache(TINY, batch=1, max_len=8))


def test_weights_that_fit_in_the_cpu_cache_are_not_tuned(tuning, monkeypatch):
    from aquila.model.model import KVCache

    path, distances = tuning
    model = Aquila(TINY).eval()
    monkeypatch.setattr(native_decode, "private_cache_bytes", lambda: native_decode.weight_bytes_per_step(model))
    step = model.decoder(KVCache(TINY, batch=1, max_len=8))
    assert step.prefetch == (0, "fits in cache") and distances == [] and not path.exists()


def test_the_private_cache_is_the_level_below_the_last(tmp_path):
    """The prefetch choice counts the cores' own caches, not the shared last level (a VM may report a socket's)."""
    def caches(*levels):
        folder = tmp_path / "-".join(str(level) for level, _ in levels)
        for index, (level, size) in enumerate(levels):
            (folder / f"index{index}").mkdir(parents=True)
            (folder / f"index{index}" / "level").write_text(f"{level}\n")
            (folder / f"index{index}" / "size").write_text(f"{size}\n")
        return str(folder)
    assert native_decode.private_cache_bytes(caches((1, "48K"), (1, "32K"), (2, "2048K"), (3, "491520K"))) == 2**21
    assert native_decode.private_cache_bytes(caches((1, "48K"), (1, "32K"), (2, "4M"))) == 48 * 2**10
    assert native_decode.private_cache_bytes(caches((1, "64K"))) is None
    assert native_decode.private_cache_bytes(str(tmp_path / "missing")) is None


def test_native_decoding_step_rejects_token_ids_outside_the_vocabulary():
    from aquila.model.model import KVCache

    model = Aquila(TINY).eval()
    cache = KVCache(TINY, batch=2, max_len=8)
    step = model.decoder(cache)
    for bad in (TINY.vocab_size, -1):
        with pytest.raises(ValueError, match=rf"tokens\[1\] is {bad}, outside the vocabulary \[0, 97\)"):
            step(torch.tensor([[3], [bad]]))
    assert cache.lengths.tolist() == [0, 0]  # nothing was written
    with pytest.raises(ValueError, match="tokens must be"):
        step(torch.tensor([3, 4]))


def run_python(code):
    """Runs `code` in a fresh interpreter: a crash there (a segfault, an abort) fails the test instead of the run."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    return result.stdout.strip()


@pytest.mark.parametrize("change", [{"n_layers": 3}, {"n_kv_heads": 4}, {"dim": 128, "n_heads": 4, "n_kv_heads": 2},
                                    {"dtype": "torch.float64"}], ids=str)
@pytest.mark.parametrize("call", ["forward_with_cache", "decoder"])
def test_a_cache_built_for_another_model_is_refused_before_any_write(change, call):
    code = f"""
import dataclasses, torch
from aquila.model.model import Aquila, KVCache
from tests.model.test_model import TINY
change = {change!r}
dtype = eval(change.pop("dtype", "torch.float32"))
model = Aquila(TINY).eval()
cache = KVCache(dataclasses.replace(TINY, **change), batch=2, max_len=16, dtype=dtype)
tokens = torch.ones(2, 1, dtype=torch.long)
try:
    if {call!r} == "forward_with_cache":
        model.forward_with_cache(tokens, cache, last_only=True)
    else:
        model.decoder(cache)
except ValueError as error:
    print(error)
"""
    message = run_python(code)
    assert message.startswith("Aquila: the KV cache's k"), message
    assert ("this model needs (2, 2, 16, 2, 16)" in message) or ("torch.float64" in message), message


@pytest.mark.parametrize("change", ["del model", "model.to(torch.bfloat16)", "model.to(torch.float64)",
                                    "model.output.weight.data = model.output.weight.data.clone()"])
def test_a_decoding_step_outlives_its_model_and_refuses_moved_weights(change):
    code = f"""
import gc, torch
from aquila.model.model import Aquila, KVCache
from tests.model.test_model import TINY
model = Aquila(TINY).eval()
step = model.decoder(KVCache(TINY, batch=1, max_len=8))
step(torch.ones(1, 1, dtype=torch.long))
{change}
gc.collect()
try:
    print(tuple(step(torch.ones(1, 1, dtype=torch.long)).shape))
except RuntimeError as error:
    print(error)
"""
    message = run_python(code)
    if change == "del model":  # the step holds what it points into: it still runs, on the weights it was made with
        assert message == f"(1, 1, {TINY.vocab_size})"
    else:
        assert "the model's weights or its cache moved" in message


@pytest.mark.parametrize("backend", [None, "torch"])
def test_the_model_trains_under_bf16_autocast_with_an_fp32_residual_stream(backend):
    """torch.autocast("cpu", bf16) around the model: matmuls in bf16, the residual stream, the norms' sums and the
    loss in fp32, gradients in the fp32 parameters' dtype and close to the fp32 run's."""
    torch.manual_seed(0)
    model = Aquila(TINY, backend=backend)
    tokens, targets = torch.randint(0, TINY.vocab_size, (2, 23)), torch.randint(0, TINY.vocab_size, (2, 23))
    losses, grads = [], []
    for autocast in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(tokens, targets)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert loss.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in model.parameters())
    eps = torch.finfo(torch.bfloat16).eps
    assert abs(losses[1] - losses[0]) <= 4 * eps * losses[0], losses
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 1 - 4 * eps


def test_the_native_step_decodes_bf16_weights_closer_to_fp32_than_the_bf16_modules():
    """bf16 weights and cache, fp32 activations: against the fp32 model on the same (bf16-valued) weights, the C++
    step's logits are within the bf16 cache's rounding, closer than the bf16 modules' (which round every
    activation), and its cache holds the same keys and values to bf16's rounding."""
    torch.manual_seed(0)
    bf16_model = Aquila(TINY).eval().to(torch.bfloat16)
    exact = Aquila(TINY).eval()
    exact.load_state_dict({name: t.float() for name, t in bf16_model.state_dict().items()})
    from aquila.model.model import KVCache

    native_cache, module_cache, exact_cache = (KVCache(TINY, 2, 12, dtype=dtype)
                                                for dtype in (torch.bfloat16, torch.bfloat16, torch.float32))
    step = native_decode.decoder(bf16_model, native_cache, bf16_inputs=False)
    assert step is not None
    tokens = torch.randint(0, TINY.vocab_size, (2, 1))
    eps = torch.finfo(torch.bfloat16).eps
    for _ in range(8):
        native = step(tokens)
        with torch.no_grad():
            module = bf16_model.forward_with_cache(tokens, module_cache)  # last_only=False: the module path
        expected = exact.forward_with_cache(tokens, exact_cache, last_only=True)
        native_error, module_error = ((t.float() - expected).abs().max().item() for t in (native, module))
        assert native.dtype == torch.float32 and native_error <= module_error
        assert native_error <= 8 * eps * expected.abs().max().item()
        tokens = expected.argmax(-1)
    torch.testing.assert_close(native_cache.k.float(), exact_cache.k, rtol=eps, atol=eps)
