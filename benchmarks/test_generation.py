"""Generation speed: Aquila's generate (preallocated KV cache on the fused decode kernels) against transformers'
`generate` on the same weights (the aquila-100m preset, random weights), greedy, in new tokens per second end to end
(prefill included, as a user waits for it), in fp32 and in bf16 (bf16 only on GPU), both stacks in the same precision.

Two workloads: one short prompt (batch 1), where both stacks are bound by reading every weight once per token (154 MB
of the 240 MB fp32 are the output projection), and a batch of 8 chat-length prompts of different lengths (400-512
tokens), where transformers pads the batch, masks it, and grows its cache by concatenation every step while Aquila's
cache is preallocated and each sequence attends to its own length only.

Each record says which way Aquila decoded (`decode_step`): on CPU, in fp32 and in bf16, each step is one C++ call
(csrc/cpu/decode.cpp), with its prefetch distance and where that came from; elsewhere the steps run the model's
modules.

`bytes` records the weights read per generated token at batch 1, so the summary shows the fraction of the measured
read bandwidth that decoding reaches.
"""

import pytest
import torch

from aquila.model import native_decode
from aquila.model.checkpoint import save_hf
from aquila.model.config import AquilaConfig
from aquila.model.generate import Sampling, generate
from aquila.model.model import Aquila, KVCache

WORKLOADS = {"batch 1, 16-token prompt": (1, 16, 0), "batch 8, 400-512-token prompts": (8, 400, 16)}


@pytest.fixture(scope="module")
def weights(tmp_path_factory, quick):
    """The preset's config, random weights (fp32) and a Hugging Face checkpoint of them."""
    config = AquilaConfig.preset("demo" if quick else "aquila-100m")
    torch.manual_seed(0)
    model = Aquila(config)
    directory = tmp_path_factory.mktemp("weights")
    save_hf(model, str(directory))
    return config, model.state_dict(), directory


@pytest.fixture(scope="module")
def models(weights, device):
    """{dtype: (Aquila, transformers' LlamaForCausalLM)} on the same weights, each made once, when first asked for."""
    transformers = pytest.importorskip("transformers")
    config, state, directory = weights
    made = {}

    def get(dtype):
        if dtype not in made:
            ours = Aquila(config)
            ours.load_state_dict(state)
            reference = transformers.LlamaForCausalLM.from_pretrained(directory)
            made[dtype] = ours.to(device, dtype).eval(), reference.to(device, dtype).eval()
        return made[dtype]

    return get


def decode_step(model, batch):
    """How Aquila's generation decodes `model` at this batch: the one-call C++ step (with its prefetch distance and
    where that came from, whether its bf16 projections take bf16 inputs and its quantized ones int8 inputs) or the
    modules."""
    weight = model.output.weight
    native = native_decode.decoder(model, KVCache(model.config, batch, max_len=1, device=weight.device,
                                                  dtype=weight.dtype))
    if native is None:
        return {"path": "modules"}
    return {"path": "native C++ step", "prefetch_bytes": native.prefetch[0], "prefetch_source": native.prefetch[1],
            "bf16_inputs": native.bf16_inputs, "int8_inputs": native.int8_inputs}


@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("impl", ["transformers generate", "aquila"])
def test_greedy_generation(measure, models, device, quick, dtype, dtype_name, workload, impl):
    ours, reference = models(dtype)
    batch, shortest, step = WORKLOADS[workload]
    if quick:
        shortest //= 8
    new_tokens = 8 if quick else 32
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, ours.config.vocab_size, (shortest + step * i,), generator=generator).tolist()
               for i in range(batch)]
    if impl == "aquila":
        run = lambda: generate(ours, prompts, Sampling(max_new_tokens=new_tokens))
    else:  # left padding and an attention mask: how transformers batches prompts of different lengths
        longest = max(len(p) for p in prompts)
        ids = torch.zeros(batch, longest, dtype=torch.long)
        mask = torch.zeros(batch, longest, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt):] = torch.tensor(prompt)
            mask[row, longest - len(prompt):] = 1
        ids, mask = ids.to(device), mask.to(device)
        run = lambda: reference.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in ours.named_parameters() if "tok_embeddings" not in n)
    with torch.no_grad():
        record = measure(f"greedy generation, {workload}, {new_tokens} new tokens, "
                         f"{ours.config.num_parameters() / 1e6:.0f}M params, {dtype_name}", impl, run,
                         rounds=3 if quick else 5, bytes_moved=weight_bytes * new_tokens if batch == 1 else None,
                         dtype=dtype, reads_only=True)
    record["tokens_per_s"] = batch * new_tokens / record["seconds"]
    if impl == "aquila":
        record["decode_step"] = decode_step(ours, batch)
