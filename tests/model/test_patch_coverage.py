"""Which attention calls of a patched transformers Llama reach Aquila's kernel, over a grid modelled on what
transformers' own Llama tests exercise (their inputs carry a padding mask by default): batch sizes, no mask, all-ones,
left, right and scattered padding, a row of padding only, explicit position ids, generation with DynamicCache and
StaticCache (greedy and beam search), GQA and MHA, eager and SDPA, scaled RoPE configs, packed sequences,
output_attentions, custom 4-D masks and attention dropout.

Each case checks the patched model against the unpatched one (logits at every position, padded ones included; the
loss and every gradient with labels on every position; generated tokens) and which path each attention call took:
padding never falls back. The module prints the coverage over the grid at the end (pytest -s), or run it directly:
``python tests/model/test_patch_coverage.py``.
"""

import collections
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import aquila.model.patch as patch_module  # noqa: E402  (after the importorskip)
from aquila.model.patch import apply_aquila_kernels_to_llama, fallback_counts, kernel_counts  # noqa: E402
from tests.model.test_patch import (  # noqa: E402
    VOCAB,
    assert_same_training_step,
    llama_config,
    random_llama,
    relative_error,
)

LAYERS = 2
# Every case's calls, added up for the summary: {"kernel": {path: n}, "fallback": {reason: n}}.
TOTALS = {"kernel": collections.Counter(), "fallback": collections.Counter()}


@pytest.fixture(scope="module", autouse=True)
def coverage_summary():
    yield
    kernel, fallback = sum(TOTALS["kernel"].values()), sum(TOTALS["fallback"].values())
    if kernel + fallback:
        print(f"\nattention calls reaching Aquila's kernel: {kernel} of {kernel + fallback} "
              f"({100 * kernel / (kernel + fallback):.1f}%); by path {dict(TOTALS['kernel'])}; "
              f"fallbacks by reason {dict(TOTALS['fallback'])}")


@pytest.fixture
def counted():
    """Resets the patch's counters and, after the test, adds them to the module's totals."""
    patch_module.reset_counts()
    yield
    TOTALS["kernel"].update(kernel_counts())
    TOTALS["fallback"].update(fallback_counts())


def padding_masks(size, length):
    """2-D attention masks: 1 for a token, 0 for padding."""
    ones = torch.ones(size, length, dtype=torch.long)
    left, right, scattered, one_row_empty = ones.clone(), ones.clone(), ones.clone(), ones.clone()
    left[0, :4] = 0
    left[1, :1] = 0
    right[0, -5:] = 0
    right[-1, -1:] = 0
    scattered[0, 3:6] = 0
    scattered[1, 0] = 0
    scattered[1, -2:] = 0
    one_row_empty[1] = 0
    one_row_empty[0, :2] = 0
    return {"none": None, "ones": ones, "left": left, "right": right, "scattered": scattered,
            # transformers' Llama tests: row i holds i + 1 tokens, then padding (and full rows past the length)
            "tril": torch.tril(torch.ones(size, length, dtype=torch.long)), "one_row_empty": one_row_empty}


def pair(config):
    reference = random_llama(config)
    return reference, apply_aquila_kernels_to_llama(copy.deepcopy(reference))


def assert_same_logits(patched, reference, **inputs):
    patched.eval()
    reference.eval()
    with torch.no_grad():
        expected, actual = reference(**inputs).logits, patched(**inputs).logits
    assert torch.isfinite(actual).all()
    # fp32 both ways; kernels sum in other orders: measured below 1e-6 of the largest logit.
    assert relative_error(actual, expected) < 1e-5
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    patched.train()
    reference.train()


# --- Forward and training --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", list(padding_masks(3, 11)))
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_padding_masks_run_on_the_kernel(mask, attn_implementation, kv_heads, counted):
    """Logits at every position and a training step with labels on every position (padded ones too, so the outputs
    at padded positions count): as unpatched, and every call on the kernel."""
    reference, patched = pair(llama_config(kv_heads, attn_implementation=attn_implementation))
    input_ids = torch.randint(0, VOCAB, (3, 11))
    attention_mask = padding_masks(3, 11)[mask]
    assert_same_logits(patched, reference, input_ids=input_ids, attention_mask=attention_mask)
    assert_same_training_step(patched, reference, input_ids, input_ids.clone(), attention_mask=attention_mask)
    assert fallback_counts() == {}
    padded = attention_mask is not None and not attention_mask.all()
    assert kernel_counts() == {"varlen" if padded else "dense": 2 * LAYERS}


@pytest.mark.parametrize("size", [1, 2, 13])
def test_batch_sizes_with_right_padding(size, counted):
    """transformers' Llama tests use batch 13, length 7 and a lower-triangular mask; a single sequence that ends in
    padding has no row to tell the queries' offset from the mask's last row."""
    reference, patched = pair(llama_config(attn_implementation="sdpa"))
    input_ids = torch.randint(0, VOCAB, (size, 7))
    attention_mask = torch.tril(torch.ones(size, 7, dtype=torch.long))
    attention_mask[0, :3] = 1
    assert_same_logits(patched, reference, input_ids=input_ids, attention_mask=attention_mask)
    assert fallback_counts() == {} and kernel_counts() == {"varlen": LAYERS}


def test_position_ids_with_left_padding(counted):
    """Positions counted from each row's first token (as generate makes them): rotary on the kernel honours them."""
    reference, patched = pair(llama_config())
    input_ids = torch.randint(0, VOCAB, (3, 11))
    attention_mask = padding_masks(3, 11)["left"]
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    assert_same_logits(patched, reference, input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids)
    assert_same_training_step(patched, reference, input_ids, input_ids.clone(), attention_mask=attention_mask,
                              position_ids=position_ids)
    assert fallback_counts() == {} and kernel_counts() == {"varlen": 2 * LAYERS}


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
], ids=lambda rope: rope["rope_type"])
def test_scaled_rope_with_padding(rope, counted):
    """Scaled RoPE: Aquila's rotary with transformers' cos/sin tables, Aquila's attention."""
    reference, patched = pair(llama_config(rope_parameters={**rope, "rope_theta": 10000.0}))
    input_ids = torch.randint(0, VOCAB, (3, 11))
    attention_mask = padding_masks(3, 11)["left"]
    assert_same_logits(patched, reference, input_ids=input_ids, attention_mask=attention_mask)
    assert fallback_counts() == {} and kernel_counts() == {"varlen": LAYERS}


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_packed_sequences(attn_implementation, counted):
    """Position ids that restart, no mask and no cache (packed training rows): transformers masks each sequence off
    the others; the kernel takes the sequences as varlen sequences."""
    reference, patched = pair(llama_config(attn_implementation=attn_implementation))
    input_ids = torch.randint(0, VOCAB, (2, 12))
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]])
    assert_same_logits(patched, reference, input_ids=input_ids, position_ids=position_ids, use_cache=False)
    assert_same_training_step(patched, reference, input_ids, input_ids.clone(), position_ids=position_ids,
                              use_cache=False)
    assert fallback_counts() == {} and kernel_counts() == {"packed": 2 * LAYERS}


# --- Generation ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("num_beams", [1, 2], ids=["greedy", "beams"])
def test_generation_with_padding(cache_implementation, attn_implementation, num_beams, counted):
    """Left-padded prompts, greedy or beam search, with transformers' DynamicCache or StaticCache (not compiled):
    the same tokens, every call on the kernel."""
    reference, patched = pair(llama_config(attn_implementation=attn_implementation))
    reference.eval()
    patched.eval()
    prompt = torch.randint(1, VOCAB, (3, 9))
    attention_mask = padding_masks(3, 9)["left"]
    settings = dict(attention_mask=attention_mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                    num_beams=num_beams, pad_token_id=0, cache_implementation=cache_implementation)
    with torch.no_grad():
        expected = reference.generate(prompt, **settings)
        actual = patched.generate(prompt, **settings)
    assert torch.equal(actual, expected)
    assert fallback_counts() == {}
    assert sum(kernel_counts().values()) == 6 * LAYERS  # the prefill and five steps


# --- What falls back, and still matches ------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_output_attentions_fall_back(attn_implementation, counted):
    reference, patched = pair(llama_config(attn_implementation=attn_implementation))
    input_ids = torch.randint(0, VOCAB, (3, 11))
    inputs = dict(input_ids=input_ids, attention_mask=padding_masks(3, 11)["left"], output_attentions=True)
    reference.eval()
    patched.eval()
    with torch.no_grad():
        expected, actual = reference(**inputs), patched(**inputs)
    assert relative_error(actual.logits, expected.logits) < 1e-5
    for weights, expected_weights in zip(actual.attentions, expected.attentions, strict=True):
        if expected_weights is None:  # SDPA returns none
            assert weights is None
        else:
            torch.testing.assert_close(weights, expected_weights, rtol=1e-4, atol=1e-6)
    assert fallback_counts() == {"output_attentions": LAYERS} and kernel_counts() == {}


def test_custom_4d_mask_falls_back(counted):
    """A prefix-LM mask (the first tokens see each other both ways) is not causal with padding."""
    reference, patched = pair(llama_config(attn_implementation="sdpa"))
    input_ids = torch.randint(0, VOCAB, (2, 10))
    allowed = torch.ones(10, 10, dtype=torch.bool).tril()
    allowed[:4, :4] = True
    attention_mask = allowed.expand(2, 1, 10, 10)
    assert_same_logits(patched, reference, input_ids=input_ids, attention_mask=attention_mask)
    assert fallback_counts() == {"custom_mask": LAYERS} and kernel_counts() == {}


def test_attention_dropout_falls_back_in_training(counted):
    reference, patched = pair(llama_config(attention_dropout=0.1))
    input_ids = torch.randint(0, VOCAB, (2, 10))
    torch.manual_seed(1)
    expected = reference(input_ids=input_ids, labels=input_ids).loss
    torch.manual_seed(1)
    actual = patched(input_ids=input_ids, labels=input_ids).loss
    assert relative_error(actual, expected) < 1e-5
    assert fallback_counts() == {"dropout": LAYERS} and kernel_counts() == {}
    assert_same_logits(patched, reference, input_ids=input_ids)  # eval: no dropout, the kernel
    assert kernel_counts() == {"dense": LAYERS}


if __name__ == "__main__":
    import sys

    sys.exit(pytest.main([__file__, "-q", "-s", "-p", "no:cacheprovider"]))
