"""The decoding step as one C++ call (csrc/cpu/decode.cpp): the plumbing between the model and that kernel.

At batch 1 a decoding step reads every weight once and does little else, so the Python and dispatch overhead of ~200
op calls would otherwise cost a third of its time. The kernel runs where it can: CPU, fp32 weights and cache, the CPU
kernels chosen (not the reference), everything contiguous.
"""

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from aquila.kernels import backend as _backend


def workspace_floats(config, batch: int, max_len: int) -> int:
    """The scratch a step needs (DecodeStep's workspace in csrc/kernels.h)."""
    return batch * (3 * config.dim + 2 * (config.n_heads + config.kv_heads) * config.head_dim
                    + 2 * config.hidden_dim + config.n_heads * max_len)


def _layer_tensors(layer, index, cache):
    return {"attention_norm": layer.attention_norm.weight, "wq": layer.attention.wq.weight,
            "wk": layer.attention.wk.weight, "wv": layer.attention.wv.weight, "wo": layer.attention.wo.weight,
            "ffn_norm": layer.ffn_norm.weight, "w1": layer.feed_forward.w1.weight, "w2": layer.feed_forward.w2.weight,
            "w3": layer.feed_forward.w3.weight, "k_cache": cache.k[index], "v_cache": cache.v[index]}


def decoder(model, cache) -> Optional[Callable[[Tensor], Tensor]]:
    """step(tokens [batch, 1]) -> logits [batch, 1, vocab] for `model` (an Aquila) and its KVCache `cache`, advancing
    the cache; None where the C++ step cannot run."""
    if model.backend not in (None, "cpu") or _backend.cpu_extension is None or cache.k.device.type != "cpu":
        return None
    layers = [_layer_tensors(layer, index, cache) for index, layer in enumerate(model.layers)]
    others = {"embeddings": model.tok_embeddings.weight, "final_norm": model.norm.weight,
              "output": model.output.weight}
    tensors = [t for layer in layers for t in layer.values()] + list(others.values())
    if not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return None
    c, (batch, max_len) = model.config, cache.k.shape[1:3]
    workspace = torch.empty(workspace_floats(c, batch, max_len))
    arguments = {"batch": batch, "dim": c.dim, "heads": c.n_heads, "kv_heads": c.kv_heads, "head_dim": c.head_dim,
                 "hidden_dim": c.hidden_dim, "vocab": c.vocab_size, "max_len": max_len, "eps": c.norm_eps,
                 "theta": c.rope_theta, "interleaved": c.rope_interleaved,
                 **{name: t.data_ptr() for name, t in others.items()}, "lengths": cache.lengths.data_ptr(),
                 "layers": [{name: t.data_ptr() for name, t in layer.items()} for layer in layers],
                 "workspace": workspace.data_ptr()}

    # The parameters themselves, not their data: model.to(dtype) swaps a parameter's data, which the step detects.
    addresses = [t.data_ptr() for t in tensors]

    def step(tokens: Tensor) -> Tensor:
        if [t.data_ptr() for t in tensors] != addresses:
            raise RuntimeError("Aquila: the model's weights or its cache moved (another dtype, device or storage) "
                               "since model.decoder(cache) was made: make a new decoder")
        cache.check_room(tokens)
        tokens = tokens.reshape(batch).to("cpu", torch.int64).contiguous()
        logits = torch.empty(batch, 1, c.vocab_size)
        _backend.cpu_extension.decode_step(
            {**arguments, "tokens": tokens.data_ptr(), "logits": logits.data_ptr()}, torch.get_num_threads())
        cache.lengths += 1
        return logits

    # With `tensors` above: everything the addresses point into lives as long as the step.
    step.keep_alive = (workspace, cache)
    return step
