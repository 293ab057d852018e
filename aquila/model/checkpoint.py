"""Loading and saving Aquila weights: the Hugging Face layout (LlamaForCausalLM names, config.json + safetensors,
sharded with an index), FlagAI's native layout (our parameter names in .bin files), and the Hugging Face layout with
weight-only quantized linears (aquila.model.quantize; the format is in docs/model.md).

Loading builds the model on the meta device and reads each tensor in chunks of rows, converting each chunk to the
target dtype (or quantizing it) straight into the tensor the model keeps: peak resident memory stays within the loaded
model's size plus a few chunks (tested). A chunk of a safetensors shard is read through a memory map opened for it
alone, and a .bin file is mapped anew after every REMAP_BYTES read, because a mapping keeps resident every page it
has read: one mapping of a whole shard would end up holding all of it.

Rotary layouts: FlagAI (Meta) checkpoints pair features (2i, 2i+1) of each head; Hugging Face checkpoints pair
(i, i + d/2), with the rows of wq and wk permuted to match. The model runs either layout (config.rope_interleaved),
so loading keeps the source's rows; saving to the Hugging Face layout permutes interleaved rows into rotate-half order
(and so do the rows of a quantized wq/wk, quantized row by row).
"""

import ctypes
import dataclasses
import functools
import json
import mmap
import os
import re
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from aquila.files import AtomicFile, make_public, write_text_atomically
from aquila.model.config import AquilaConfig
from aquila.model.model import Aquila
from aquila.model.quantize import (
    Quantization,
    QuantizedLinear,
    quantization_of,
    quantize_model,
    quantize_tensor,
    quantized_shapes,
)

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


# The same by module, for the tensors of a quantized linear (qweight, scales, zeros) beside the weights.
LAYER_MODULES = {ours.removesuffix(".weight"): theirs.removesuffix(".weight") for ours, theirs in LAYER_NAMES.items()}
GLOBAL_MODULES = {ours.removesuffix(".weight"): theirs.removesuffix(".weight") for ours, theirs in GLOBAL_NAMES.items()}


def hf_name(name: str) -> str:
    """Our name of a parameter or a quantized layer's buffer -> the Hugging Face one."""
    module, _, attribute = name.rpartition(".")
    if module in GLOBAL_MODULES:
        return f"{GLOBAL_MODULES[module]}.{attribute}"
    _, index, rest = module.split(".", 2)
    return f"model.layers.{index}.{LAYER_MODULES[rest]}.{attribute}"


def interleaved_to_rotate_half(weight: Tensor, heads: int) -> Tensor:
    """Rows of wq/wk (or of their quantized tensors, one row per output feature) from pairs (2i, 2i+1) to pairs
    (i, i + d/2) within each head."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, -1).transpose(1, 2).reshape(weight.shape)


def rotate_half_to_interleaved(weight: Tensor, heads: int) -> Tensor:
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).transpose(1, 2).reshape(weight.shape)


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


# --- The quantized checkpoint format ----------------------------------------------------------------------------------

# config.json's "quantization_config" names the format (quant_method) and its version: a loader refuses any other.
# Every shard repeats them in its safetensors metadata, so that no shard is read as another kind. Version 1 said
# whether the output projection was quantized as the blocks (quantized_output); version 2 says how (output_bits: 8,
# 4 or null). Both are read; version 2 is written.
QUANT_METHOD = "aquila-weight-only"
FORMAT_VERSION = 2
QUANTIZATION_KEYS = {1: ("quant_method", "format_version", "bits", "group_size", "symmetric", "quantized_output"),
                     2: ("quant_method", "format_version", "bits", "group_size", "symmetric", "output_bits")}


def quantization_config(spec: Quantization) -> dict:
    """config.json's "quantization_config" for a checkpoint quantized as spec."""
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "bits": spec.bits,
            "group_size": spec.group_size, "symmetric": spec.symmetric, "output_bits": spec.output_bits}


def _metadata_strings(section: Optional[dict]) -> dict[str, str]:
    """The safetensors metadata of each shard for a quantization_config section (strings only, as the format
    wants)."""
    if section is None:
        return {"format": "pt"}
    return {"format": "pt", **{key: json.dumps(value) if not isinstance(value, str) else value
                               for key, value in section.items()}}


def shard_metadata(spec: Optional[Quantization]) -> dict[str, str]:
    """The safetensors metadata of each shard of a checkpoint quantized as spec (None: not quantized)."""
    return _metadata_strings(None if spec is None else quantization_config(spec))


def read_quantization_config(values: dict, path: str) -> tuple[Optional[dict], Optional[Quantization]]:
    """config.json's quantization_config and the Quantization it describes ((None, None) when the checkpoint is not
    quantized): a ValueError naming the file for a format or version this code does not read, or a description that
    is incomplete or invalid."""
    section = values.get("quantization_config")
    if section is None:
        return None, None
    if not isinstance(section, dict):
        raise ValueError(f"{path}: quantization_config must be an object, got {type(section).__name__}")
    if section.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{path}: quantization_config's quant_method {section.get('quant_method')!r} is not a format "
                         f"aquila reads (it reads {QUANT_METHOD!r})")
    version = section.get("format_version")
    if isinstance(version, bool) or version not in QUANTIZATION_KEYS:
        raise ValueError(f"{path}: {QUANT_METHOD} format version {version!r} is unknown; this aquila reads versions "
                         f"{' and '.join(map(str, QUANTIZATION_KEYS))}")
    keys = QUANTIZATION_KEYS[version]
    unknown = sorted(set(section) - set(keys))
    missing = [key for key in keys if key not in section]
    if unknown or missing:
        raise ValueError(f"{path}: quantization_config has unknown keys {unknown} and lacks {missing}; version "
                         f"{version} takes {list(keys)}")
    if version == 1:
        if not isinstance(section["quantized_output"], bool):
            raise ValueError(f"{path}: quantization_config's quantized_output must be a bool")
        output_bits = section["bits"] if section["quantized_output"] else None
    else:
        output_bits = section["output_bits"]
    try:
        return section, Quantization(section["bits"], section["group_size"], section["symmetric"], output_bits)
    except ValueError as error:
        raise ValueError(f"{path}: quantization_config: {error}") from None


def checkpoint_quantization(directory: str) -> Optional[Quantization]:
    """How the checkpoint in `directory` is quantized, from its config.json (None: it is not)."""
    path = os.path.join(directory, "config.json")
    return read_quantization_config(read_json(path), path)[1]


def _check_shard_metadata(metadata: dict, section: Optional[dict], path: str) -> None:
    """Refuses a shard whose metadata describes another quantization than config.json's section (or none where it
    has one)."""
    if section is None:
        if "quant_method" in metadata:
            raise ValueError(f"{path}: the shard is quantized ({metadata['quant_method']}) but config.json has no "
                             "quantization_config")
        return
    expected = _metadata_strings(section)
    if metadata.get("quant_method") != expected["quant_method"] or (metadata.get("format_version")
                                                                     != expected["format_version"]):
        raise ValueError(f"{path}: the shard's metadata names format {metadata.get('quant_method')!r} version "
                         f"{metadata.get('format_version')!r}; config.json says {QUANT_METHOD!r} version "
                         f"{section['format_version']}")
    different = [key for key in section if metadata.get(key) != expected[key]]
    if different:
        raise ValueError(f"{path}: the shard's metadata differs from config.json's quantization_config in "
                         f"{', '.join(different)}")


# --- Reading ----------------------------------------------------------------------------------------------------------

# Rows read, converted and quantized at a time: up to this many elements (16 MiB in float64), at least one row.
CHUNK_ELEMENTS = 1 << 21
# A .bin file's memory map is renewed after this many bytes have been read through it.
REMAP_BYTES = 128 << 20
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}
TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}


class Stored(NamedTuple):
    """A tensor of a checkpoint file, read on demand: rows(start, stop) gives rows [start, stop) along the first
    dimension."""

    name: str
    path: str
    dtype: Optional[torch.dtype]  # None: a safetensors dtype torch has no name for here
    shape: tuple
    rows: Callable[[int, int], Tensor]


def read_json(path: str) -> dict:
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


def _safetensors_files(directory: str) -> list[str]:
    """model.safetensors, or the shards of model.safetensors.index.json."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index}: expected a \"weight_map\" object of tensor names to file names")
        return [os.path.join(directory, file) for file in sorted(set(weight_map.values()))]
    if os.path.exists(os.path.join(directory, "model.safetensors")):
        return [os.path.join(directory, "model.safetensors")]
    raise FileNotFoundError(f"load: no model.safetensors or model.safetensors.index.json in {directory}")


def _safetensors_rows(path: str, name: str) -> Callable[[int, int], Tensor]:
    def rows(start: int, stop: int) -> Tensor:
        from safetensors import SafetensorError, safe_open

        try:  # a map of the file for these rows alone: closing it takes its pages out of the resident set
            with safe_open(path, framework="pt") as f:
                return f.get_slice(name)[start:stop]
        except SafetensorError as error:
            raise ValueError(f"{path}: cannot read {name!r} ({error})") from None

    return rows


def _hf_tensors(directory: str, quantization: Optional[dict]) -> Iterator[Stored]:
    """The tensors of model.safetensors or of the shards of its index, each shard's metadata checked against
    config.json's quantization_config (read_quantization_config's; None: not quantized)."""
    from safetensors import SafetensorError, safe_open

    for path in _safetensors_files(directory):
        try:
            with safe_open(path, framework="pt") as f:  # the header only: no tensor is read here
                _check_shard_metadata(f.metadata() or {}, quantization, path)
                header = [(name, f.get_slice(name)) for name in f.keys()]  # noqa: SIM118 (keys() only, no iteration)
                listing = [(name, part.get_dtype(), tuple(part.get_shape())) for name, part in header]
        except SafetensorError as error:
            raise ValueError(f"{path}: not a valid safetensors file ({error})") from None
        for name, code, shape in listing:
            yield Stored(name, path, TORCH_DTYPES.get(code), shape, _safetensors_rows(path, name))


def _torch_load(path: str, mmap: bool) -> dict:
    try:
        # weights_only: unpickling builds tensors and containers only, so a file can never run code.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
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
    return state


class _MappedWeights:
    """A .bin file's tensors through a memory map renewed after every REMAP_BYTES read. A file in PyTorch's legacy
    (pre-zip) format cannot be mapped: it is read whole, once."""

    def __init__(self, path: str):
        self.path, self.mapped = path, zipfile.is_zipfile(path)
        self.state, self.bytes_read = _torch_load(path, self.mapped), 0

    def rows(self, name: str, start: int, stop: int) -> Tensor:
        if self.mapped and self.bytes_read > REMAP_BYTES:
            self.state, self.bytes_read = None, 0
            self.state = _torch_load(self.path, mmap=True)
        chunk = self.state[name][start:stop]
        self.bytes_read += chunk.numel() * chunk.element_size()
        return chunk


def _flagai_tensors(directory: str) -> Iterator[Stored]:
    files = sorted(f for f in os.listdir(directory) if f.endswith(".bin"))
    if not files:
        raise FileNotFoundError(f"load: no .bin weight files in {directory}")
    for file in files:
        path = os.path.join(directory, file)
        weights = _MappedWeights(path)
        listing = [(name, t.dtype, tuple(t.shape)) for name, t in weights.state.items()]
        for name, dtype, shape in listing:
            yield Stored(name, path, dtype, shape,
                         lambda start, stop, name=name, weights=weights: weights.rows(name, start, stop))


def _row_chunks(shape: tuple) -> Iterator[tuple[int, int]]:
    """[start, stop) row ranges of a tensor of `shape`, each of up to CHUNK_ELEMENTS elements (at least one row)."""
    rows = shape[0] if shape else 1
    per_row = max(1, int(torch.Size(shape[1:]).numel()))
    step = max(1, CHUNK_ELEMENTS // per_row)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _read_dense(stored: Stored, dtype: torch.dtype, device) -> Tensor:
    """The tensor in dtype on device, converted chunk by chunk."""
    if stored.dtype is None or not stored.dtype.is_floating_point:
        raise ValueError(f"load: {stored.path}: tensor {stored.name!r} is {stored.dtype or 'of a dtype torch lacks'}, "
                         "not floating point")
    out = empty_weight(stored.shape, dtype, device)
    for start, stop in _row_chunks(stored.shape):
        out[start:stop].copy_(stored.rows(start, stop))
    return out


HUGE_PAGE_BYTES = 2 << 20  # x86-64's and arm64's (4 KiB base pages) transparent huge page


def huge_page_span(tensor: Tensor) -> tuple[int, int]:
    """(start, end): the addresses of the whole HUGE_PAGE_BYTES pages in a tensor's memory (none if end <= start)."""
    start = -(-tensor.data_ptr() // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    return start, (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES


@functools.cache
def _madvise() -> Optional[Callable[[int, int, int], int]]:
    """The C library's madvise, or None where Python knows no MADV_HUGEPAGE (not Linux)."""
    if getattr(mmap, "MADV_HUGEPAGE", None) is None:
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def advise_pages(tensor: Tensor, advice: int) -> int:
    """madvise(advice) (mmap.MADV_*) over the whole huge pages inside a CPU tensor's memory: 0, or the errno of a
    refusal. Nothing to advise (no whole huge page, another device, no madvise) is 0 too."""
    start, end = huge_page_span(tensor)
    madvise = _madvise()
    if madvise is None or tensor.device.type != "cpu" or end <= start:
        return 0
    return ctypes.get_errno() if madvise(start, end - start, advice) else 0


def empty_weight(shape, dtype: torch.dtype, device) -> Tensor:
    """torch.empty, on a CPU asking Linux for transparent huge pages (MADV_HUGEPAGE) over the whole 2 MiB pages inside
    it, before anything is written there: a decoding step reads every weight once per token, and on 4 KiB pages that
    is a TLB miss every 4 KiB, dearer still under a hypervisor (a two-level page walk); on Aquila-7B's widths bf16 and
    int8 steps ran 5-8% faster (benchmarks/huge_pages.py). Systems whose THP setting is `always` give such pages
    anyway, and those set to `never` refuse: the advice is a request, and a refusal changes nothing else."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        advise_pages(out, mmap.MADV_HUGEPAGE)
    return out


@functools.cache
def _malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's malloc_trim, or None on another C library."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def _release_freed_heap() -> None:
    """Hands the C heap's free pages back to the system. Quantizing a tensor frees its chunks' temporaries, a few
    MB each, between the quantized buffers kept for the model, and glibc keeps such holes in the heap resident:
    without this, loading Aquila-7B as int8 took 0.7-1.4 GB more than the model."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _read_quantizing(stored: Stored, layer: QuantizedLinear, device) -> dict[str, Tensor]:
    """A weight [out, in] quantized as `layer` is, chunk by chunk of rows (each row is quantized on its own):
    {buffer: tensor}."""
    if stored.dtype is None or not stored.dtype.is_floating_point:
        raise ValueError(f"load: {stored.path}: tensor {stored.name!r} is {stored.dtype or 'of a dtype torch lacks'}, "
                         "not floating point")
    layout = (layer.bits, layer.group_size, layer.symmetric)
    shapes = quantized_shapes(*stored.shape, *layout)
    out = {buffer: empty_weight(shape, dtype, device) for buffer, (dtype, shape) in shapes.items()}
    for start, stop in _row_chunks(stored.shape):
        chunk = quantize_tensor(stored.rows(start, stop), *layout, name=f"{stored.path}: tensor {stored.name!r}")
        for buffer, tensor in out.items():
            tensor[start:stop].copy_(getattr(chunk, buffer))
    return out


def _read_quantized(stored: Stored, expected: Tensor, device) -> Tensor:
    """A quantized layer's buffer as stored (dtype as the format says, no conversion), its values checked."""
    if stored.dtype != expected.dtype:
        raise ValueError(f"load: {stored.path}: tensor {stored.name!r} is {stored.dtype or 'of a dtype torch lacks'}; "
                         f"the format stores it as {expected.dtype}")
    out = empty_weight(stored.shape, stored.dtype, device)
    is_scales, is_zeros = stored.name.endswith(".scales"), stored.name.endswith(".zeros")
    for start, stop in _row_chunks(stored.shape):
        chunk = stored.rows(start, stop)
        if is_scales and not (torch.isfinite(chunk).all() and (chunk >= 0).all()):
            raise ValueError(f"load: {stored.path}: tensor {stored.name!r} has negative, NaN or infinite scales")
        if is_zeros and (chunk > 15).any():
            raise ValueError(f"load: {stored.path}: tensor {stored.name!r} has zero points above 15")
        out[start:stop].copy_(chunk)
    return out


class _Target(NamedTuple):
    module: nn.Module
    attribute: str  # a parameter or a QuantizedLinear's buffer; "weight" of a QuantizedLinear is quantized as read
    expected: Tensor  # a meta tensor of the shape (and, for a stored quantized buffer, the dtype) to read


def _targets(model: Aquila, quantized_checkpoint: bool) -> dict[str, _Target]:
    """{our name: where a checkpoint tensor goes} for every tensor the model needs from a checkpoint."""
    targets = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, QuantizedLinear):
            if quantized_checkpoint:
                for buffer, tensor in module.named_buffers(recurse=False):
                    targets[prefix + buffer] = _Target(module, buffer, tensor)
            else:
                weight = torch.empty(module.out_features, module.in_features, device="meta")
                targets[prefix + "weight"] = _Target(module, "weight", weight)
            continue
        for attribute, parameter in module.named_parameters(recurse=False):
            targets[prefix + attribute] = _Target(module, attribute, parameter)
    if model.config.tie_embeddings:
        targets.pop("output.weight", None)
    return targets


def _assign(model: Aquila, tensors: Iterator[Stored], rename: dict, dtype, device, source: str,
            quantized_checkpoint: bool):
    targets = _targets(model, quantized_checkpoint)
    seen = set()
    unexpected = []
    for stored in tensors:
        name = rename.get(stored.name)
        if name is None or name not in targets:
            unexpected.append(stored.name)
            continue
        if name in seen:
            raise ValueError(f"load: {stored.path}: tensor {stored.name!r} appears twice in the {source}")
        target = targets[name]
        if tuple(stored.shape) != tuple(target.expected.shape):
            raise ValueError(f"load: {source} tensor {stored.name!r} has shape {tuple(stored.shape)}, the model's "
                             f"{name!r} needs {tuple(target.expected.shape)}")
        if isinstance(target.module, QuantizedLinear) and quantized_checkpoint:
            setattr(target.module, target.attribute, _read_quantized(stored, target.expected, device))
        elif isinstance(target.module, QuantizedLinear):
            for buffer, tensor in _read_quantizing(stored, target.module, device).items():
                setattr(target.module, buffer, tensor)
            _release_freed_heap()
        else:
            tensor = _read_dense(stored, dtype, device)
            setattr(target.module, target.attribute, torch.nn.Parameter(tensor, requires_grad=True))
        seen.add(name)
    missing = sorted(set(targets) - seen)
    if missing or unexpected:
        raise ValueError(f"load: {source} does not match the model: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    if model.config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight


def load(directory: str, dtype: torch.dtype = torch.float32, device="cpu", backend: Optional[str] = None,
         quantize: Optional[Quantization] = None) -> Aquila:
    """A model from a checkpoint directory: the Hugging Face layout (config.json with model_type llama and
    safetensors), quantized or not, or FlagAI's (config.json with FlagAI's fields and .bin files).

    dtype: the parameters' (embeddings, norms, and the linears that are not quantized), which is also the dtype the
    model computes in. quantize: quantize the linears while loading (aquila.model.quantize.Quantization). A quantized
    checkpoint loads quantized as it is stored; quantize, if given, must describe the same quantization."""
    path = os.path.join(directory, "config.json")
    values = read_json(path)
    hf = "hidden_size" in values
    section, stored_spec = read_quantization_config(values, path) if hf else (None, None)
    try:
        config = config_from_hf(values) if hf else AquilaConfig.from_dict(
            {"rope_interleaved": True, **{k: v for k, v in values.items() if k != "checkpoint_activations"}})
    except KeyError as error:
        raise ValueError(f"{path}: missing the key {error.args[0]!r}") from None
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: {error}") from None
    if quantize is not None and config.tie_embeddings:
        quantize = dataclasses.replace(quantize, output_bits=None)  # an output tied to the embeddings stays dense
    if stored_spec is not None and quantize is not None and quantize != stored_spec:
        raise ValueError(f"load: {directory} holds a checkpoint quantized as {stored_spec.describe()}; it cannot be "
                         f"loaded as {quantize.describe()}: load it without quantize= (--quantize), as it is "
                         "stored, or quantize the original weights")
    spec = stored_spec or quantize
    with torch.device("meta"):
        model = Aquila(config, backend=backend)
    if spec is not None:
        quantize_model(model, spec.bits, spec.group_size, spec.symmetric, spec.output_bits)
    names = list(_targets(model, stored_spec is not None))
    if hf:
        _assign(model, _hf_tensors(directory, section), {hf_name(n): n for n in names}, dtype, device,
                "quantized Hugging Face checkpoint" if stored_spec else "Hugging Face checkpoint",
                stored_spec is not None)
    else:
        _assign(model, _flagai_tensors(directory), {n: n for n in names}, dtype, device, "FlagAI checkpoint", False)
    return model


# --- Saving ---------------------------------------------------------------------------------------------------------


# What save_hf writes into a checkpoint directory; with overwrite=True a directory holding only these is replaced.
WRITTEN_FILES = re.compile(r"config\.json|model\.safetensors(\.index\.json)?|model-\d{5}-of-\d{5}\.safetensors")


def check_destination(directory: str, overwrite: bool = False,
                      how_to_replace: str = "overwrite=True (aquila convert --force)") -> None:
    """Raises FileExistsError unless save_hf may write `directory`: it does not exist, is an empty directory, or,
    with overwrite, is a directory holding nothing but a checkpoint's files (WRITTEN_FILES). Files of any other name
    are never deleted, so a directory with such files is refused even with overwrite. how_to_replace: the option that
    allows replacing, for the message."""
    if not os.path.lexists(directory):
        return
    if not os.path.isdir(directory):
        raise FileExistsError(f"{directory} exists and is not a directory")
    existing = sorted(os.listdir(directory))
    if existing and not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty; choose a new directory, or replace the "
                              f"checkpoint in it with {how_to_replace}")
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


def checkpoint_tensors(model: Aquila) -> Iterator[tuple[str, Tensor]]:
    """(our name, tensor) of everything a checkpoint of the model holds, in the model's order: its parameters (a
    shared one once) and its quantized layers' buffers."""
    seen = set()
    for module_name, module in model.named_modules():
        tensors = list(module.named_parameters(recurse=False))
        if isinstance(module, QuantizedLinear):
            tensors += list(module.named_buffers(recurse=False))
        for name, tensor in tensors:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                yield (f"{module_name}.{name}" if module_name else name), tensor.detach()


def save_hf(model: Aquila, directory: str, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False):
    """Writes config.json and safetensors shards (with an index when there are several) in the Hugging Face layout,
    into a temporary directory renamed to `directory` at the end: a crash never leaves a half-written checkpoint. A
    model with quantized linears (aquila.model.quantize) is written in the quantized format (docs/model.md).

    `directory` must not exist or be empty; with overwrite=True it may also hold an earlier checkpoint (only
    check_destination's files), which is replaced. Files and directories get the permissions the umask gives."""
    save_hf_tensors(model.config, checkpoint_tensors(model), directory, max_shard_bytes, overwrite,
                    quantization=quantization_of(model))


def save_hf_tensors(config: AquilaConfig, tensors: Iterable[tuple[str, Tensor]], directory: str,
                    max_shard_bytes: int = 5 * 2**30, overwrite: bool = False,
                    quantization: Optional[Quantization] = None):
    """save_hf from (our name, tensor) pairs, such as a state dict gathered from a sharded model, or tensors made
    one at a time: each shard is written as soon as it is full, so at most one shard's tensors are held at once.
    quantization: how the quantized linears among the tensors are quantized (None: none is)."""
    directory = os.path.realpath(directory)  # a symbolic link to a directory: replace the directory it names
    check_destination(directory, overwrite)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".saving-", dir=parent)
    try:
        make_public(staging)  # mkdtemp's directory is private (0700); a checkpoint is not
        metadata = shard_metadata(quantization)
        shards: list[list[str]] = []  # the names in each shard written so far, as part-N in the staging directory
        current, size = {}, 0

        def write_shard():
            write_safetensors(os.path.join(staging, f"part-{len(shards) + 1}"), current, metadata)
            shards.append(list(current))

        for name, tensor in tensors:
            tensor = tensor.cpu()
            if config.rope_interleaved and name.rpartition(".")[0].endswith(("attention.wq", "attention.wk")):
                heads = config.n_heads if ".wq." in name else config.kv_heads
                tensor = interleaved_to_rotate_half(tensor, heads)
            if current and size + tensor.numel() * tensor.element_size() > max_shard_bytes:
                write_shard()
                current, size = {}, 0
            current[hf_name(name)] = tensor.contiguous()
            size += tensor.numel() * tensor.element_size()
        write_shard()
        weight_map = {}
        for number, names in enumerate(shards, 1):
            file = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            os.replace(os.path.join(staging, f"part-{number}"), os.path.join(staging, file))
            weight_map.update({name: file for name in names})
        if len(shards) > 1:
            write_text_atomically(os.path.join(staging, "model.safetensors.index.json"),
                                  json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        values = config_to_hf(config)
        if quantization is not None:
            values["quantization_config"] = quantization_config(quantization)
        write_text_atomically(os.path.join(staging, "config.json"), json.dumps(values, indent=2))
        if os.path.isdir(directory):
            _replace_directory(directory, staging)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def random_tensors(config: AquilaConfig, seed: int = 0,
                   dtype: torch.dtype = torch.bfloat16) -> Iterator[tuple[str, Tensor]]:
    """(our name, tensor) of a model of `config` with random weights, made one at a time (a chunk of rows at a time
    in float32) as Aquila.init_weights draws them: Normal(0, initializer_range) matrices, norms of ones. The same
    seed gives the same tensors."""
    with torch.device("meta"):
        model = Aquila(config)
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        tensor = torch.empty(parameter.shape, dtype=dtype)
        if parameter.dim() == 1:
            tensor.fill_(1.0)
        else:
            for start, stop in _row_chunks(tuple(parameter.shape)):
                rows = torch.randn(stop - start, *parameter.shape[1:], generator=generator)
                tensor[start:stop] = rows.mul_(config.initializer_range)
        yield name, tensor


def save_random_hf(config: AquilaConfig, directory: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                   overwrite: bool = False, max_shard_bytes: int = 5 * 2**30):
    """A random-weight checkpoint of `config` in the Hugging Face layout (random_tensors), for tests and benchmarks:
    written as it is drawn, so that no more than one shard is held at once (Aquila-7B in bf16 is 14.6 GB)."""
    save_hf_tensors(config, random_tensors(config, seed, dtype), directory, max_shard_bytes, overwrite)


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
