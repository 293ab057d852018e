"""Decoding speed: Aquila's generation (KV cache on the fused kernels) against transformers' `generate` on the same
weights (the aquila-100m preset, random weights, fp32 on CPU), greedy, batch 1, in new tokens per second."""

import pytest
import torch

from aquila.model.checkpoint import save_hf
from aquila.model.config import AquilaConfig
from aquila.model.generate import Sampling, generate
from aquila.model.model import Aquila

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory, device, quick):
    transformers = pytest.importorskip("transformers")
    config = AquilaConfig.preset("demo" if quick else "aquila-100m")
    torch.manual_seed(0)
    ours = Aquila(config).to(device).eval()
    directory = tmp_path_factory.mktemp("aquila-100m")
    save_hf(ours, str(directory))
    reference = transformers.LlamaForCausalLM.from_pretrained(directory).to(device).eval()
    return ours, reference


@pytest.mark.parametrize("impl", ["transformers generate", "aquila"])
def test_greedy_decoding(measure, models, device, impl):
    ours, reference = models
    prompt = torch.randint(0, ours.config.vocab_size, (1, 16), device=device)
    if impl == "aquila":
        step = lambda: generate(ours, [prompt[0].tolist()], Sampling(max_new_tokens=NEW_TOKENS))  # noqa: E731
    else:
        step = lambda: reference.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,  # noqa: E731
                                          do_sample=False)
    with torch.no_grad():
        record = measure(f"greedy decoding {NEW_TOKENS} tokens, {ours.config.num_parameters() / 1e6:.0f}M params",
                         impl, step, rounds=5)
    record["tokens_per_s"] = NEW_TOKENS / record["seconds"]
