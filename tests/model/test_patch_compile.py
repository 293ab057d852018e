"""torch.compile(fullgraph=True) of a patched transformers LlamaForCausalLM: the patch decides from shapes, dtypes and
flags while tracing, and checks a mask with tensor ops that torch.cond turns into the choice between Aquila's kernel
and transformers' attention when the graph runs. Generation steps over transformers' StaticCache (decoding compiled,
the prefill not, as generate does) give the tokens and logits of the uncompiled patched model, on the KV-cache kernel
with and without left padding; a compiled training step gives its loss and gradients.

The "aot_eager" backend traces exactly what inductor would be given, without spending the test's time generating
C++; tests/kernels/test_torch_compile.py compiles the ops with inductor too.
"""

import copy
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from aquila.model.patch import apply_aquila_kernels_to_llama  # noqa: E402  (after the importorskip)
from tests.model.test_patch import VOCAB, batch, llama_config, random_llama  # noqa: E402

LAYERS = 1  # one layer: tracing time grows with the layers, what is traced does not change
CACHE_LENGTH = 16
attention_module = sys.modules["aquila.kernels.attention"]


@pytest.fixture
def kernel_runs(monkeypatch):
    """How often the attention kernels ran, counted where the ops' implementations call them: inside a compiled
    graph too."""
    runs = {"attention": 0, "kv_cache": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            runs[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(attention_module, "_forward", counting("attention", attention_module._forward))
    monkeypatch.setattr(attention_module, "_kv_cache_forward", counting("kv_cache", attention_module._kv_cache_forward))
    return runs


def generate_over_static_cache(model, step, prompt, attention_mask, cache, steps):
    """Greedy decoding: the prefill with `model`, each new token with `step`. The 2-D mask has the cache's length
    throughout (zeros past the filled part), so the compiled step sees the same shapes at every call."""
    length = prompt.shape[1]
    mask = torch.zeros(prompt.shape[0], CACHE_LENGTH, dtype=torch.long)
    mask[:, :length] = attention_mask
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        output = model(prompt, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        logits = [output.logits[:, -1]]
        for _ in range(steps):
            token = logits[-1].argmax(-1, keepdim=True)
            mask[:, length] = 1
            length += 1
            positions = positions[:, -1:] + 1
            logits.append(step(token, attention_mask=mask, position_ids=positions, cache=cache,
                               use_cache=True).logits[:, -1])
    return torch.stack(logits, 1)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_compiled_decoding_over_a_static_cache(attn_implementation, kernel_runs):
    torch._dynamo.reset()
    reference = random_llama(llama_config(attn_implementation=attn_implementation, num_hidden_layers=LAYERS)).eval()
    patched = apply_aquila_kernels_to_llama(copy.deepcopy(reference))
    compiled = torch.compile(patched, fullgraph=True, backend="aot_eager")
    prompt = torch.randint(0, VOCAB, (2, 7))
    cache = transformers.StaticCache(config=patched.config, max_cache_len=CACHE_LENGTH)
    for padding in (0, 3):  # the same graph: torch.cond takes the padded path when the mask has padding
        attention_mask = torch.ones_like(prompt)
        attention_mask[0, :padding] = 0
        caches = [cache, *(transformers.StaticCache(config=patched.config, max_cache_len=CACHE_LENGTH)
                           for _ in range(2))]
        cache.reset()
        kernel_runs["kv_cache"] = 0
        actual = generate_over_static_cache(patched, compiled, prompt, attention_mask, caches[0], steps=4)
        assert kernel_runs["kv_cache"] == 4 * LAYERS  # every compiled step on the KV-cache kernel
        expected = generate_over_static_cache(patched, patched, prompt, attention_mask, caches[1], steps=4)
        unpatched = generate_over_static_cache(reference, reference, prompt, attention_mask, caches[2], steps=4)
        assert torch.equal(actual.argmax(-1), expected.argmax(-1))
        assert torch.equal(actual.argmax(-1), unpatched.argmax(-1))
        # The same kernels in fp32, summing in the same order: equal to rounding.
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_compiled_training_step(kernel_runs):
    """Without a cache: the kernel when the mask is plain causal, transformers' attention for padding (unpadding
    would need shapes that depend on the mask's values), decided inside the one graph."""
    torch._dynamo.reset()
    config = llama_config(attn_implementation="sdpa", num_hidden_layers=LAYERS)
    reference = apply_aquila_kernels_to_llama(random_llama(config))
    patched = copy.deepcopy(reference)
    compiled = torch.compile(patched, fullgraph=True, backend="aot_eager")
    input_ids, labels = batch()
    # The kernel's forward runs twice per layer: torch.cond's backward recomputes the branch it took.
    for padding, kernel_calls in ((0, 2 * LAYERS), (2, 0)):
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, :padding] = 0
        reference.zero_grad()
        patched.zero_grad()
        kernel_runs["attention"] = 0
        loss = compiled(input_ids=input_ids, labels=labels, attention_mask=attention_mask, use_cache=False).loss
        loss.backward()
        assert kernel_runs["attention"] == kernel_calls
        expected = reference(input_ids=input_ids, labels=labels, attention_mask=attention_mask, use_cache=False).loss
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
        for (name, parameter), expected_parameter in zip(patched.named_parameters(), reference.parameters()):
            expected_grad = expected_parameter.grad
            torch.testing.assert_close(parameter.grad, expected_grad, rtol=1e-4,
                                       atol=1e-5 * expected_grad.abs().max().item(),
                                       msg=lambda message, name=name: f"{name}: {message}")
