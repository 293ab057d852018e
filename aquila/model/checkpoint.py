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
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from typing import Optional

import torch
from torch import Tensor

from aquila.files import AtomicFile, make_public, write_text_atomically
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


def _read_json(path: str) -> dict:
    """A JSON object from a file; anything else is a ValueError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(values).__name__}")
    return values


def _hf_tensors(directory: str) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) from model.safetensors or the shards of model.safetensors.index.json, one at a time."""
    from safetensors import SafetensorError, safe_open

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index}: expected a \"weight_map\" object of tensor names to file names")
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(directory, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"load: no model.safetensors or model.safetensors.index.json in {directory}")
    for file in files:
        path = os.path.join(directory, file)
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has keys() but is not iterable)
                    yield name, f.get_tensor(name)
        except SafetensorError as error:
            raise ValueError(f"{path}: not a valid safetensors file ({error})") from None


def _flagai_tensors(directory: str) -> Iterator[tuple[str, Tensor]]:
    files = sorted(f for f in os.listdir(directory) if f.endswith(".bin"))
    if not files:
        raise FileNotFoundError(f"load: no .bin weight files in {directory}")
    for file in files:
        path = os.path.join(directory, file)
        try:
            # weights_only: unpickling builds tensors and containers only, so a file can never run code.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except OSError:
            raise
        except Exception as error:  # torch reports a bad file as UnpicklingError, RuntimeError, EOFError, ...
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(f"{path}: not a readable PyTorch weights file ({reason})") from None
        if isinstance(state, dict) and isinstance(state.get("module"), dict):
            state = state["module"]  # FlagAI wraps weights in {"module": ...}
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a dict of parameter names to tensors, got {type(state).__name__}")
        for name, tensor in state.items():
            if not isinstance(tensor, Tensor):
                raise ValueError(f"{path}: {name!r} holds a {type(tensor).__name__}, not a tensor")
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
    path = os.path.join(directory, "config.json")
    values = _read_json(path)
    hf = "hidden_size" in values
    try:
        config = config_from_hf(values) if hf else AquilaConfig.from_dict(
            {"rope_interleaved": True, **{k: v for k, v in values.items() if k != "checkpoint_activations"}})
    except KeyError as error:
        raise ValueError(f"{path}: missing the key {error.args[0]!r}") from None
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: {error}") from None
    with torch.device("meta"):
        model = Aquila(config, backend=backend)
    names = [name for name, _ in model.named_parameters()]
    if hf:
        _assign(model, _hf_tensors(directory), {hf_name(n): n for n in names}, dtype, device, "Hugging Face checkpoint")
    else:
        _assign(model, _flagai_tensors(directory), {n: n for n in names}, dtype, device, "FlagAI checkpoint")
    return model


# --- Saving ---------------------------------------------------------------------------------------------------------


# What save_hf writes into a checkpoint directory; with overwrite=True a directory holding only these is replaced.
WRITTEN_FILES = re.compile(r"config\.json|model\.safetensors(\.index\.json)?|model-\d{5}-of-\d{5}\.safetensors")
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}


def check_destination(directory: str, overwrite: bool = False) -> None:
    """Raises FileExistsError unless save_hf may write `directory`: it does not exist, is an empty directory, or,
    with overwrite, is a directory holding nothing but a checkpoint's files (WRITTEN_FILES). Files of any other name
    are never deleted, so a directory with such files is refused even with overwrite."""
    if not os.path.lexists(directory):
        return
    if not os.path.isdir(directory):
        raise FileExistsError(f"{directory} exists and is not a directory")
    existing = sorted(os.listdir(directory))
    if existing and not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty; choose a new directory, or replace the "
                              "checkpoint in it with overwrite=True (aquila convert --force)")
    others = [name for name in existing
              if not (WRITTEN_FILES.fullmatch(name) and os.path.isfile(os.path.join(directory, name)))]
    if others:
        raise FileExistsError(f"{directory} holds files that are not a checkpoint's config.json or safetensors "
                              f"({', '.join(others[:5])}{' ...' if len(others) > 5 else ''}); they would be lost, "
                              "so it is not replaced")


def write_safetensors(path: str, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """The safetensors format (an 8-byte header length, the JSON header padded to 8 bytes, then each tensor's
    little-endian bytes), streamed tensor by tensor through AtomicFile: no copy of the whole shard in memory, and
    the umask's permissions (safetensors' own save_file makes a private 0600 file)."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"write_safetensors: {name!r} has dtype {tensor.dtype}, which safetensors cannot hold")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with AtomicFile(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for tensor in tensors.values():
            out.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def save_hf(model: Aquila, directory: str, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False):
    """Writes config.json and safetensors shards (with an index when there are several) in the Hugging Face layout,
    into a temporary directory renamed to `directory` at the end: a crash never leaves a half-written checkpoint.

    `directory` must not exist or be empty; with overwrite=True it may also hold an earlier checkpoint (only
    check_destination's files), which is replaced. Files and directories get the permissions the umask gives."""
    save_hf_tensors(model.config, ((name, p.detach()) for name, p in model.named_parameters()), directory,
                    max_shard_bytes, overwrite)


def save_hf_tensors(config: AquilaConfig, tensors: Iterable[tuple[str, Tensor]], directory: str,
                    max_shard_bytes: int = 5 * 2**30, overwrite: bool = False):
    """save_hf from (our parameter name, tensor) pairs, such as a state dict gathered from a sharded model."""
    directory = os.path.realpath(directory)  # a symbolic link to a directory: replace the directory it names
    check_destination(directory, overwrite)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".saving-", dir=parent)
    try:
        make_public(staging)  # mkdtemp's directory is private (0700); a checkpoint is not
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
            write_safetensors(os.path.join(staging, file), shard, metadata={"format": "pt"})
            weight_map.update({name: file for name in shard})
        if len(shards) > 1:
            write_text_atomically(os.path.join(staging, "model.safetensors.index.json"),
                                  json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        write_text_atomically(os.path.join(staging, "config.json"), json.dumps(config_to_hf(config), indent=2))
        if os.path.isdir(directory):
            _replace_directory(directory, staging)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_directory(directory: str, staging: str) -> None:
    """Moves `staging` into the place of `directory` (empty, or an earlier checkpoint that check_destination
    accepted), then deletes the earlier checkpoint's files by name: a file that appeared meanwhile is kept, in the
    moved-aside directory the error names."""
    previous = f"{staging}-previous"
    os.replace(directory, previous)
    try:
        os.replace(staging, directory)
    except BaseException:
        os.replace(previous, directory)
        raise
    for name in os.listdir(previous):
        if WRITTEN_FILES.fullmatch(name):
            os.unlink(os.path.join(previous, name))
    try:
        os.rmdir(previous)
    except OSError:
        raise FileExistsError(f"{directory} was replaced, but files appeared in it meanwhile; they are in "
                              f"{previous}") from None
