import copy

import pytest
import torch

from aquila.model.config import AquilaConfig
from aquila.model.generate import Sampling, generate, next_tokens
from aquila.model.model import Aquila

TINY = AquilaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Aquila(TINY).eval()


def greedy_without_cache(model, prompt, steps):
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


def test_greedy_matches_recomputing_the_whole_sequence(model):
    prompts = [[5, 17, 3], [1, 2, 3, 4, 5, 6, 7, 8]]  # different lengths in one batch
    outputs = generate(model, prompts, Sampling(max_new_tokens=6))
    assert outputs == [greedy_without_cache(model, p, 6) for p in prompts]


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    prompts = [[9, 8, 7]]
    greedy = generate(model, prompts, Sampling(max_new_tokens=5))
    assert generate(model, prompts, Sampling(temperature=1.0, top_k=1, max_new_tokens=5, seed=1)) == greedy
    assert generate(model, prompts, Sampling(temperature=1.0, top_p=1e-6, max_new_tokens=5, seed=1)) == greedy


def test_seeded_sampling_is_reproducible(model):
    sampling = Sampling(temperature=1.5, max_new_tokens=12, seed=123)
    first = generate(model, [[1, 2], [3]], sampling)
    assert generate(model, [[1, 2], [3]], sampling) == first
    others = [generate(model, [[1, 2], [3]], Sampling(temperature=1.5, max_new_tokens=12, seed=s)) for s in range(5)]
    assert any(o != first for o in others)


def test_stop_tokens_and_min_new_tokens(model):
    prompt = [[4, 4, 4]]
    greedy = generate(model, prompt, Sampling(max_new_tokens=8))[0]
    stop = greedy[2]
    stopped = generate(model, prompt, Sampling(max_new_tokens=8, stop_tokens=(stop,)))[0]
    assert stopped == greedy[:greedy.index(stop) + 1]  # up to and including the stop token
    delayed = generate(model, prompt, Sampling(max_new_tokens=8, stop_tokens=(stop,), min_new_tokens=8))
    assert len(delayed[0]) == 8 and stop not in delayed[0]


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.0]])
    history = torch.tensor([[2, -1]])
    assert next_tokens(logits, history, Sampling(), None, True).item() == 2
    assert next_tokens(logits, history, Sampling(repetition_penalty=2.0), None, True).item() == 3


@pytest.mark.parametrize("values, words", [
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(min_new_tokens=5, max_new_tokens=2), "min_new_tokens <= max_new_tokens"),
])
def test_bad_sampling_options(values, words):
    with pytest.raises(ValueError, match=words):
        Sampling(**values)


class ScriptedModel:
    """Stands in for Aquila in the text-level tests: 'generates' a fixed token sequence (its logits put all mass on
    the next scripted token), so stop strings and streaming are tested on known text."""

    def __init__(self, script: list[int], vocab_size: int):
        self.script, self.vocab_size = script, vocab_size


def scripted_tokens(monkeypatch, script, vocab_size):
    from aquila.model import generate as module

    def fake_generate_tokens(model, prompts, sampling=None, stop=None, truncate_prompt=False):
        sampling = sampling or Sampling()
        active = [True] * len(prompts)
        for token in script[:sampling.max_new_tokens]:
            tokens = [token if a else -1 for a in active]
            yield torch.tensor(tokens)
            if stop is not None:
                active = [a and not s for a, s in zip(active, stop(tokens))]
            if not any(active):
                return

    monkeypatch.setattr(module, "generate_tokens", fake_generate_tokens)


def test_stream_text_holds_back_partial_characters_and_stop_strings(small_tokenizer, monkeypatch):
    from aquila.model.generate import generate_text, stream_text

    text = "床前明月光 #1 ## 疑是###地上霜"
    ids = small_tokenizer.encode(text)
    scripted_tokens(monkeypatch, ids, small_tokenizer.vocab_size)
    pieces = [p[0] for p in stream_text(None, small_tokenizer, [[1]], Sampling(max_new_tokens=100), ["###"])]
    assert "".join(pieces) == "床前明月光 #1 ## 疑是"
    assert not any("\ufffd" in p for p in pieces)
    assert "###" not in "".join(pieces)
    # The stream ended at the stop string: fewer steps than tokens.
    assert len(pieces) - 1 < len(ids)
    assert generate_text(None, small_tokenizer, [[1]], Sampling(max_new_tokens=100)) == [text]
    assert generate_text(None, small_tokenizer, [[1]], Sampling(max_new_tokens=100), ["地上", "明月"]) == ["床前"]


def test_stream_text_never_emits_a_prefix_of_a_stop_string_early(small_tokenizer, monkeypatch):
    from aquila.model.generate import stream_text

    ids = [small_tokenizer.encode(c)[0] for c in "ab#c##d"]
    scripted_tokens(monkeypatch, ids, small_tokenizer.vocab_size)
    pieces = [p[0] for p in stream_text(None, small_tokenizer, [[1]], Sampling(max_new_tokens=50), ["###"])]
    assert pieces == ["a", "b", "", "#c", "", "", "##d", ""]


def test_text_generation_on_a_real_model_matches_the_token_path(small_tokenizer):
    from aquila.model.generate import generate_text

    torch.manual_seed(0)
    model = Aquila(AquilaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=small_tokenizer.vocab_size,
                                multiple_of=16, max_seq_len=64)).eval()
    prompts = [small_tokenizer.encode("床前", bos=True), small_tokenizer.encode("def f(x):", bos=True)]
    sampling = Sampling(max_new_tokens=12)
    token_outputs = generate(model, prompts, sampling)
    assert generate_text(model, small_tokenizer, prompts, sampling) == \
        [small_tokenizer.decode(ids) for ids in token_outputs]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")
def test_decoding_on_gpu_runs_the_cuda_decode_kernel(model, monkeypatch):
    """On GPU every layer of every decoding step attends through the CUDA decode kernel, and greedy generation gives
    the CPU's tokens."""
    from aquila.kernels import backend

    if backend.cuda_extension is None:
        pytest.skip("aquila._cuda is not built (no nvcc at install)")
    kernel, launches = backend.cuda_extension.decode_attention, []
    monkeypatch.setattr(backend.cuda_extension, "decode_attention",
                        lambda *args: launches.append(args) or kernel(*args))
    prompts, sampling = [[5, 17, 3], [1, 2, 3, 4, 5, 6, 7, 8]], Sampling(max_new_tokens=6)
    on_gpu = generate(copy.deepcopy(model).cuda(), prompts, sampling)
    assert on_gpu == generate(model, prompts, sampling)
    decoding_steps = sampling.max_new_tokens - 1
    assert len(launches) >= decoding_steps * TINY.n_layers


@pytest.mark.parametrize("name", ["temperature", "top_p", "repetition_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_sampling_parameters_are_refused(name, value):
    with pytest.raises(ValueError, match=f"Sampling: {name} must be a finite number, got {value}"):
        Sampling(**{name: value})


def test_a_prompt_longer_than_the_context_is_refused(model):
    prompt = list(range(1, 61))  # 60 tokens + 6 new ones > the context of 64
    with pytest.raises(ValueError, match=r"a prompt of 60 tokens and max_new_tokens \(6\) exceed the model's context "
                                         r"of 64 tokens.*truncate_prompt=True"):
        generate(model, [prompt], Sampling(max_new_tokens=6))
    with pytest.raises(ValueError, match=r"max_new_tokens \(64\) leaves no room for a prompt"):
        generate(model, [[1]], Sampling(max_new_tokens=64))


def test_truncate_prompt_keeps_the_prompts_last_tokens(model):
    prompt = list(range(1, 61))
    truncated = generate(model, [prompt], Sampling(max_new_tokens=6), truncate_prompt=True)
    assert truncated == generate(model, [prompt[-58:]], Sampling(max_new_tokens=6))
