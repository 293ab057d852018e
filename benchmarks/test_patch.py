"""Training step of a transformers causal LM (Llama, Qwen2, Gemma 2) before and after apply_aquila_kernels_to_<family>,
in the same process on the same weights and batch: forward with labels, backward, AdamW step (and forward + backward
alone). Time per step, tokens per second and extra peak memory; the patched run's record also carries its ratios to
the unpatched one (speedup_vs_transformers, peak_memory_vs_transformers).

The baseline is transformers as users get it by default: attn_implementation "sdpa" (torch's fused attention; "eager"
for Gemma 2, whose attention logit softcapping SDPA lacks), its norms, rotary, MLP activation and loss in torch eager.
use_cache=False in both, as training loops set it (otherwise transformers keeps a KV cache of the training batch). On
CPU: hidden 512, 4 layers, 8 heads of 64, MLP 1376, vocab 32000, batch 2 x 512 tokens, fp32 (bf16 and 8 x 2048 tokens
on GPU); Gemma 2 at its default softcaps and a window (4096) longer than the batch. --quick: tiny models, to check
that the benchmark runs.
"""

import pytest
import torch

from aquila.model.checkpoint import config_from_hf
from aquila.train.metrics import flops_per_token

IMPLS = ["transformers", "transformers + aquila"]
# family: (config class, causal LM class, what the family's config needs beyond the shared sizes).
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(attn_implementation="sdpa")),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(attn_implementation="sdpa")),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(attn_implementation="eager")),
}
# The unpatched run's record, for the patched run's ratios (IMPLS runs in this order).
baseline_records = {}


def llama_sizes(quick, device):
    """The sizes of every family's model (multi-head attention, as Llama's config defaults to; Qwen2's would be GQA)
    and the batch shape."""
    if quick:
        return dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                    intermediate_size=176, vocab_size=1000), (2, 64)
    model = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                 intermediate_size=1376, vocab_size=32000)
    if device == "cuda":  # a GPU has room for a realistic batch
        return model, (8, 2048)
    return model, (2, 512)


def step_flops(config, batch, seq):
    """Model FLOPs of a training step of a transformers config's model on batch x seq tokens, counted as the trainer
    counts them for MFU (aquila.train.metrics.flops_per_token: a Llama's matrices; Gemma 2's extra norms and the
    softcaps are not counted)."""
    return flops_per_token(config_from_hf(config.to_dict()), seq) * batch * seq


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, device, quick):
    transformers = pytest.importorskip("transformers")
    name = request.param
    config_class, causal_lm_name, settings = FAMILIES[name]
    sizes, shape = llama_sizes(quick, device)
    head_dim = sizes["hidden_size"] // sizes["num_attention_heads"]
    if name == "gemma2":  # heads of the Llama's size, queries scaled by head_dim^-0.5 as in the others
        settings = dict(settings, head_dim=head_dim, query_pre_attn_scalar=head_dim)
    config = getattr(transformers, config_class)(**sizes, **settings, max_position_embeddings=max(shape[1], 128),
                                                 use_cache=False)
    causal_lm = getattr(transformers, causal_lm_name)
    torch.manual_seed(0)
    state = causal_lm(config).state_dict()
    input_ids = torch.randint(0, config.vocab_size, shape, device=device)
    labels = input_ids.clone()
    labels[:, :8] = -100  # a prompt part that does not count, as in instruction tuning
    return name, causal_lm, config, state, input_ids, labels


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("phase", ["training step", "forward+backward"])
def test_training(measure, benchmark, family, device, quick, phase, impl):
    """phase: the whole step (the number that matters), or without the optimizer, whose temporaries (foreach AdamW
    holds several parameter-sized lists at once) can set the step's peak and hide what the model's own activations
    and logits need."""
    name, causal_lm, config, state, input_ids, labels = family
    model = causal_lm(config)
    model.load_state_dict(state)
    model.to(device, torch.bfloat16 if device == "cuda" else torch.float32).train()  # the benchmarks' dtypes
    if impl != "transformers":
        from aquila.model import patch

        getattr(patch, f"apply_aquila_kernels_to_{name}")(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        if phase == "training step":
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert torch.isfinite(loss)

    batch, seq = input_ids.shape
    parameters = sum(p.numel() for p in model.parameters())
    label = f"{name} {phase} {batch}x{seq}, {parameters / 1e6:.1f}M params"
    rounds = 3 if quick or phase != "training step" else 7
    record = measure(label, impl, step, flops=step_flops(config, batch, seq), memory=True, rounds=rounds)
    record["tokens_per_s"] = batch * seq / record["seconds"]
    if not benchmark.disabled:
        # The best round too: on a shared machine other processes stretch some rounds (even the median, at 7
        # rounds), never shorten one.
        record["best_seconds"] = benchmark.stats.stats.min
    baseline = baseline_records.get(label)
    if impl == "transformers":
        baseline_records[label] = record
    elif baseline is not None:
        record["speedup_vs_transformers"] = baseline["seconds"] / record["seconds"]
        if "best_seconds" in record and "best_seconds" in baseline:
            record["best_speedup_vs_transformers"] = baseline["best_seconds"] / record["best_seconds"]
        if record.get("peak_extra_bytes") and baseline.get("peak_extra_bytes"):
            record["peak_memory_vs_transformers"] = record["peak_extra_bytes"] / baseline["peak_extra_bytes"]
