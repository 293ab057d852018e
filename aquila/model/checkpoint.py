"""Loading and saving Aquila weights: the Hugging Face layout (LlamaForCausalLM names, config.json + safetensors,
sharded with an index) and FlagAI's native layout (our parameter names in .bin files).

Loading streams tensor by tensor into a model built on the meta device, converting each to the target dtype as it
comes, so peak host memory stays near one copy of the weights in that dtype (FlagAI users needed several).

Rotary layouts: FlagAI (Meta) checkpoints pair features (2i, 2i+1) of each head; Hugging Face checkpoints pair
(i, i + d/2), with the rows of wq and wk permuted to match. The model runs either layout (config.rope_interleaved),
so loading keeps the source's rows; saving to the Hugging Face layout permutes interleaved rows into rotate-half order.
"""

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import Optional

import torch
from torch import Tensor

from aquila.model.config import AquilaConfig
from aquila.model.model import Aquila

# Our (FlagAI's) parameter names -> Hugging Face LlamaForCausalLM's, per layer and global.
LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
GLOBAL_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}


def hf_name(name: str) -> str:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    _, index, rest = name.split(".", 2)
    return f"model.layers.{index}.{LAYER_NAMES[rest]}"


def interleaved_to_rotate_half(weight: Tensor, heads: int) -> Tensor:
    """Rows of wq/wk from pairs (2i, 2i+1) to pairs (i, i + d/2) within each head."""
    rows, columns = weight.shape
    return weight.view(heads, rows // heads // 2, 2, columns).transpose(1, 2).reshape(rows, columns)


def rotate_half_to_interleaved(weight: Tensor, heads: int) -> Tensor:
    rows, columns = weight.shape
    return weight.view(heads, 2, rows // heads // 2, columns).transpose(1, 2).reshape(rows, columns)


# --- Configs --------------------------------------------------------------------------------------------------------


def config_from_hf(values: dict) -> AquilaConfig:
    heads = values["num_attention_heads"]
    return AquilaConfig(
        dim=values["hidden_size"], n_layers=values["num_hidden_layers"], n_heads=heads,
        n_kv_heads=values.get("num_key_value_heads", heads), vocab_size=values["vocab_size"],
        ffn_dim=values["intermediate_size"], norm_eps=values.get("rms_norm_eps", 1e-6),
        max_seq_len=values.get("max_position_embeddings", 2048),
        rope_theta=values.get("rope_theta", (values.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        rope_interleaved=False, tie_embeddings=values.get("tie_word_embeddings", False),
        initializer_range=values.get("initializer_range", 0.02))


def config_to_hf(config: AquilaConfig) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": config.dim,
            "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
            "num_key_value_heads": config.kv_heads, "intermediate_size": config.hidden_dim,
            "vocab_size": config.vocab_size, "rms_norm_eps": config.norm_eps,
            "max_position_embeddings": config.max_seq_len, "rope_theta": config.rope_theta,
            "tie_word_embeddings": config.tie_embeddings, "initializer_range": config.initializer_range,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32"}


# --- Loading --------------------------------------------------------------------------------------------------------


def _hf_tensors(directory: str) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) from model.safetensors or the shards of model.safetensors.index.json, one at a time."""
    from safetensors import safe_open

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(directory, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"load: no model.safetensors or model.safetensors.index.json in {directory}")
    for file in files:
        with safe_open(os.path.join(directory, file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has keys() but is not iterable)
                yield name, f.get_tensor(name)


def _flagai_tensors(directory: str) -> Iterator[tuple[str, Tensor]]:
    files = sorted(f for f in os.listdir(directory) if f.endswith(".bin"))
    if not files:
        raise FileNotFoundError(f"load: no .bin weight files in {directory}")
    for file in files:
        state = torch.load(os.path.join(directory, file), map_location="cpu", weights_only=True)
        state = state.get("module", state)  # FlagAI wraps weights in {"module": ...}
        yield from state.items()
        del state


def _assign(model: Aquila, tensors: Iterator[tuple[str, Tensor]], rename, dtype, device, source: str):
    expected = dict(model.named_parameters())
    if model.config.tie_embeddings:
        expected.pop("output.weight", None)
    seen = set()
    unexpected = []
    for stored_name, tensor in tensors:
        name = rename.get(stored_name)
        if name is None or name not in expected:
            unexpected.append(stored_name)
            continue
        parameter = expected[name]
        if tuple(tensor.shape) != tuple(parameter.shape):
            raise ValueError(f"load: {source} tensor {stored_name!r} has shape {tuple(tensor.shape)}, the model's "
                             f"{name!r} needs {tuple(parameter.shape)}")
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, attribute, torch.nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=True))
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing or unexpected:
        raise ValueError(f"load: {source} does not match the model: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    if model.config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight


def load(directory: str, dtype: torch.dtype = torch.float32, device="cpu", backend: Optional[str] = None) -> Aquila:
    """A model from a checkpoint directory: the Hugging Face layout (config.json with model_type llama and
    safetensors), or FlagAI's (config.json with FlagAI's fields and .bin files)."""
    with open(os.path.join(directory, "config.json")) as f:
        values = json.load(f)
    hf = "hidden_size" in values
    config = config_from_hf(values) if hf else AquilaConfig.from_dict(
        {"rope_interleaved": True, **{k: v for k, v in values.items() if k != "checkpoint_activations"}})
    with torch.device("meta"):
        model = Aquila(config, backend=backend)
    names = [name for name, _ in model.named_parameters()]
    if hf:
        _assign(model, _hf_tensors(directory), {hf_name(n): n for n in names}, dtype, device, "Hugging Face checkpoint")
    else:
        _assign(model, _flagai_tensors(directory), {n: n for n in names}, dtype, device, "FlagAI checkpoint")
    return model


# --- Saving ---------------------------------------------------------------------------------------------------------


def save_hf(model: Aquila, directory: str, max_shard_bytes: int = 5 * 2**30):
    """Writes config.json and safetensors shards (with an index when there are several) in the Hugging Face layout,
    into a temporary directory renamed over `directory` at the end: a crash never leaves a half-written
    checkpoint."""
    save_hf_tensors(model.config, ((name, p.detach()) for name, p in model.named_parameters()), directory,
                    max_shard_bytes)


def save_hf_tensors(config: AquilaConfig, tensors: Iterable[tuple[str, Tensor]], directory: str,
                    max_shard_bytes: int = 5 * 2**30):
    """save_hf from (our parameter name, tensor) pairs, such as a state dict gathered from a sharded model."""
    from safetensors.torch import save_file

    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".saving-", dir=parent)
    try:
        shards, current, size = [], {}, 0
        for name, tensor in tensors:
            tensor = tensor.cpu()
            if config.rope_interleaved and name.endswith(("attention.wq.weight", "attention.wk.weight")):
                heads = config.n_heads if name.endswith("wq.weight") else config.kv_heads
                tensor = interleaved_to_rotate_half(tensor, heads)
            if current and size + tensor.numel() * tensor.element_size() > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[hf_name(name)] = tensor.contiguous()
            size += tensor.numel() * tensor.element_size()
        shards.append(current)
        weight_map = {}
        for number, shard in enumerate(shards, 1):
            file = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(staging, file), metadata={"format": "pt"})
            weight_map.update({name: file for name in shard})
        if len(shards) > 1:
            with open(os.path.join(staging, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(config_to_hf(config), f, indent=2)
        if os.path.exists(directory):
            previous = f"{staging}-previous"
            os.replace(directory, previous)
            os.replace(staging, directory)
            shutil.rmtree(previous)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
