"""The Aquila decoder, composed from aquila.kernels: config, blocks, forward.

A pre-norm LLaMA-style decoder. Each block's two RMSNorms are fused with the residual adds in front of them, rotary
and attention run on the fused kernels (packed documents through cu_seqlens), and training computes the loss straight
from the last hidden states with the fused linear cross-entropy, so the N x V logits never exist. Parameter names
follow FlagAI's layout (tok_embeddings, layers.N.attention.wq, feed_forward.w1/w2/w3, attention_norm, ffn_norm, norm,
output).

Checkpoints live in checkpoint.py, generation in generate.py, the chat template in chat.py and the patch that puts
these kernels into transformers' LlamaForCausalLM in patch.py; the CPU decoding step as one C++ call in
native_decode.py; weight-only int8/int4 linears (QuantizedLinear, which replace the nn.Linear layers) in quantize.py.
"""

from collections.abc import Callable
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from aquila import IGNORE_INDEX
from aquila.kernels import RMSNorm, apply_rotary, attention, attention_with_kv_cache, linear_cross_entropy, swiglu
from aquila.model import native_decode
from aquila.model.config import AquilaConfig
from aquila.model.quantize import QuantizedLinear, int8_inputs


class KVCache:
    """Preallocated keys and values of every layer, [n_layers, batch, max_len, kv_heads, head_dim] each, and how many
    positions of each sequence are filled."""

    def __init__(self, config: AquilaConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        shape = (config.n_layers, batch, max_len, config.kv_heads, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)

    def sequence(self, index: int) -> "KVCache":
        """A view of one sequence's cache (batch 1), sharing storage and lengths: prompts of different lengths are
        prefilled through it one at a time, straight into the batch's cache."""
        view = object.__new__(KVCache)
        view.k, view.v = self.k[:, index:index + 1], self.v[:, index:index + 1]
        view.lengths = self.lengths[index:index + 1]
        return view

    def check_matches(self, config: AquilaConfig, device: torch.device, dtype: torch.dtype):
        """Raises unless this cache was built for a model of `config` whose weights are on `device` in `dtype`: the
        decoding kernels write into it by the model's shapes."""
        expected = (config.n_layers, self.lengths.shape[0], self.k.shape[2], config.kv_heads, config.head_dim)
        for name, t in (("k", self.k), ("v", self.v)):
            if tuple(t.shape) != expected:
                raise ValueError(f"Aquila: the KV cache's {name} has shape {tuple(t.shape)} but this model needs "
                                 f"{expected} ([n_layers, batch, max_len, kv_heads, head_dim]): build the cache "
                                 "with this model's config")
            if t.device != device or t.dtype != dtype:
                raise ValueError(f"Aquila: the KV cache's {name} is {t.dtype} on {t.device} but the model's weights "
                                 f"are {dtype} on {device}")
        if self.lengths.dtype != torch.int32 or self.lengths.device != device or self.lengths.dim() != 1:
            raise ValueError(f"Aquila: the KV cache's lengths must be int32 [batch] on {device}, got "
                             f"{self.lengths.dtype} {tuple(self.lengths.shape)} on {self.lengths.device}")

    def check_room(self, tokens: Tensor):
        """Raises unless tokens [batch, new] match the cache's batch and fit after every sequence's positions."""
        if tokens.dim() != 2 or tokens.shape[0] != self.lengths.shape[0]:
            raise ValueError(f"Aquila: tokens must be [batch, new] with the cache's batch {self.lengths.shape[0]}, "
                             f"got shape {tuple(tokens.shape)}")
        if int(self.lengths.max()) + tokens.shape[1] > self.k.shape[2]:
            raise ValueError(f"Aquila: the cache holds {self.k.shape[2]} positions; {tokens.shape[1]} more do not "
                             "fit")


class LayerCache(NamedTuple):
    k: Tensor  # [batch, max_len, kv_heads, head_dim]
    v: Tensor
    lengths: Tensor  # filled positions per sequence, this step's new tokens included
    slots: Tensor  # where the new tokens go, as rows of the cache flattened to [batch * max_len, ...]


class Attention(nn.Module):
    def __init__(self, config: AquilaConfig, backend: Optional[str] = None):
        super().__init__()
        self.config, self.backend = config, backend
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x: Tensor, positions: Optional[Tensor], cu_seqlens: Optional[Tensor],
                cache: Optional[LayerCache] = None) -> Tensor:
        batch, seq, _ = x.shape
        c = self.config
        q = self.wq(x).view(batch, seq, c.n_heads, c.head_dim)
        k = self.wk(x).view(batch, seq, c.kv_heads, c.head_dim)
        v = self.wv(x).view(batch, seq, c.kv_heads, c.head_dim)
        q, k = apply_rotary(q, k, positions, theta=c.rope_theta, interleaved=c.rope_interleaved, backend=self.backend)
        if cache is not None:  # the new tokens go after each sequence's filled positions, then attend to all of them
            for store, new in ((cache.k, k), (cache.v, v)):
                store.view(-1, *store.shape[2:]).index_copy_(0, cache.slots, new.reshape(-1, *new.shape[2:]))
            out = attention_with_kv_cache(q, cache.k, cache.v, cache.lengths, backend=self.backend)
        elif cu_seqlens is None:
            out = attention(q, k, v, causal=True, backend=self.backend)
        else:  # documents packed into the batch's rows: flatten them into one list of sequences
            flat = [t.reshape(batch * seq, *t.shape[2:]) for t in (q, k, v)]
            out = attention(*flat, causal=True, cu_seqlens_q=cu_seqlens, backend=self.backend)
        return self.wo(out.reshape(batch, seq, c.n_heads * c.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), the activation fused (recomputed in the backward rather than saved)."""

    def __init__(self, config: AquilaConfig, backend: Optional[str] = None):
        super().__init__()
        self.backend = backend
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x), backend=self.backend))


class Block(nn.Module):
    """Pre-norm block. Takes and returns (x, residual): the residual add in front of each norm is fused into it."""

    def __init__(self, config: AquilaConfig, backend: Optional[str] = None):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps, backend=backend)
        self.attention = Attention(config, backend)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps, backend=backend)
        self.feed_forward = FeedForward(config, backend)

    def forward(self, x, residual, positions, cu_seqlens, cache=None):
        if residual is None:  # the first block: the embeddings are the residual stream
            normed, residual = self.attention_norm(x), x
        else:
            normed, residual = self.attention_norm(x, residual)
        x = self.attention(normed, positions, cu_seqlens, cache)
        normed, residual = self.ffn_norm(x, residual)
        return self.feed_forward(normed), residual


class Aquila(nn.Module):
    def __init__(self, config: AquilaConfig, backend: Optional[str] = None, activation_checkpointing: bool = False):
        super().__init__()
        self.config, self.backend = config, backend
        self.activation_checkpointing = activation_checkpointing
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, backend) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps, backend=backend)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Normal(0, initializer_range) for every matrix, ones for the norms (also after building on meta, then
        to_empty on a real device)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, self.config.initializer_range)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def forward(self, tokens: Tensor, targets: Optional[Tensor] = None, *, positions: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None, ignore_index: int = IGNORE_INDEX,
                num_tokens: Optional[float] = None) -> Tensor:
        """tokens [batch, seq]. With targets [batch, seq], returns the mean loss over targets that are not
        ignore_index (or their sum / num_tokens), never materialising the logits; without, the logits
        [batch, seq, vocab]. positions (position ids, [seq] or [batch, seq]) and cu_seqlens (int32 [documents + 1]
        over the flattened batch) describe packed documents."""
        if tokens.dim() != 2:
            raise ValueError(f"Aquila: tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        x = self.tok_embeddings(tokens)
        residual = None
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x, residual = torch.utils.checkpoint.checkpoint(layer, x, residual, positions, cu_seqlens,
                                                                use_reentrant=False)
            else:
                x, residual = layer(x, residual, positions, cu_seqlens)
        hidden, _ = self.norm(x, residual)
        if targets is None:
            return self.output(hidden)
        output = self.output
        weight = output.dequantize(hidden.dtype) if isinstance(output, QuantizedLinear) else output.weight
        return linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index, num_tokens=num_tokens,
                                    backend=self.backend)

    def _check_cache(self, cache: KVCache):
        # The cache holds what the key projections write: activations, in the embeddings' dtype (a quantized
        # projection computes in its input's).
        weight = self.tok_embeddings.weight
        cache.check_matches(self.config, weight.device, weight.dtype)

    def _native_decoder(self, cache: KVCache) -> Optional[Callable[[Tensor], Tensor]]:
        """The one-call C++ decoding step where it applies: on CPU with the CPU kernels, embeddings, norms and cache in
        fp32 or bf16, each linear dense in that dtype or a QuantizedLinear (int8 or int4). None elsewhere (fp16, a
        GPU, the torch reference backend): the model then decodes through its modules."""
        return native_decode.decoder(self, cache)

    @torch.no_grad()
    def forward_with_cache(self, tokens: Tensor, cache: KVCache, last_only: bool = False) -> Tensor:
        """Logits [batch, new, vocab] of new tokens [batch, new] appended to each sequence in the cache (a prompt
        for the prefill, then one token at a time), which is updated in place. last_only: the last position's
        logits alone ([batch, 1, vocab]), all that sampling needs (a prefill's other logits would cost a full
        vocabulary projection per prompt token); on the CPU these come from the decoding step's own projection
        loops (native_decode.output_logits), in fp32 as a step's do. Quantized linears take their inputs rounded to
        int8 where the decoding step does (native_decode.default_int8_inputs: bf16 on a CPU with VNNI, unless
        AQUILA_DECODE_INT8_INPUTS says otherwise), so that a prompt and the steps after it compute alike."""
        self._check_cache(cache)
        if tokens.shape[-1:] == (1,) and last_only:
            native = self._native_decoder(cache)
            if native is not None:
                return native(tokens)
        cache.check_room(tokens)
        new = tokens.shape[1]
        positions = cache.lengths[:, None].long() + torch.arange(new, device=tokens.device)
        rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None]
        slots = (rows * cache.k.shape[2] + positions).view(-1)
        cache.lengths += new
        x = self.tok_embeddings(tokens)
        rounds = x.device.type == "cpu" and self.backend in (None, "cpu") and native_decode.default_int8_inputs(x.dtype)
        residual = None
        with int8_inputs(rounds):
            for index, layer in enumerate(self.layers):
                x, residual = layer(x, residual, positions, None,
                                    LayerCache(cache.k[index], cache.v[index], cache.lengths, slots))
            if last_only:
                x, residual = x[:, -1:], residual[:, -1:]
            hidden, _ = self.norm(x, residual)
            logits = native_decode.output_logits(self, hidden, rounds) if last_only else None
            return self.output(hidden) if logits is None else logits

    def decoder(self, cache: KVCache) -> Callable[[Tensor], Tensor]:
        """step(tokens [batch, 1]) -> logits [batch, 1, vocab]: forward_with_cache(tokens, cache, last_only=True),
        with what a generation loop can prepare once prepared once (the one-call C++ step's weight and cache
        pointers and its workspace). A step refuses to run once the weights have moved (another dtype, device or
        storage): make a new decoder then."""
        self._check_cache(cache)
        native = self._native_decoder(cache)
        if native is not None:
            return native
        return lambda tokens: self.forward_with_cache(tokens, cache, last_only=True)
