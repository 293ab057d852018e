"""The Aquila model's configuration: FlagAI's config.json fields, plus what FlagAI left implicit.

FlagAI's Aquila config.json has dim, n_layers, n_heads, multiple_of, norm_eps, vocab_size, max_seq_len and
initializer_range; it silently dropped unknown keys, so a typo went unnoticed. Here an unknown key is an error.
"""

import dataclasses
import json
import math
from typing import Optional

from aquila.files import write_text_atomically


@dataclasses.dataclass(frozen=True)
class AquilaConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: n_heads (no GQA)
    vocab_size: int = 100008
    multiple_of: int = 256  # the SwiGLU width is rounded up to a multiple of this
    ffn_dim: Optional[int] = None  # None: LLaMA's rule, 2/3 of 4 * dim rounded up to multiple_of (11008 for 4096)
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rope_interleaved: bool = False  # rotary pairs (2i, 2i+1) as in Meta/FlagAI weights; False: Hugging Face's halves
    tie_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"AquilaConfig: {name} must be a positive int, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"AquilaConfig: dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(f"AquilaConfig: the head dim dim / n_heads must be even for rotary, got {self.head_dim}")
        if self.kv_heads < 1 or self.n_heads % self.kv_heads:
            raise ValueError(f"AquilaConfig: n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                             f"({self.n_kv_heads})")
        if self.ffn_dim is not None and (not isinstance(self.ffn_dim, int) or self.ffn_dim < 1):
            raise ValueError(f"AquilaConfig: ffn_dim must be a positive int or None, got {self.ffn_dim!r}")
        if not self.norm_eps > 0 or not self.rope_theta > 0 or not self.initializer_range > 0:
            raise ValueError("AquilaConfig: norm_eps, rope_theta and initializer_range must be > 0")

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @property
    def kv_heads(self):
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hidden_dim(self):
        """The SwiGLU width: ffn_dim, or LLaMA's rule from dim and multiple_of."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        return self.multiple_of * math.ceil(int(2 * 4 * self.dim / 3) / self.multiple_of)

    def num_parameters(self):
        """Parameters of the model this config describes, counted from the shapes (no biases)."""
        attention = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.kv_heads)
        feed_forward = 3 * self.dim * self.hidden_dim
        per_layer = attention + feed_forward + 2 * self.dim  # two RMSNorm weights
        embeddings = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + embeddings + self.dim  # + the final norm

    @classmethod
    def from_dict(cls, values):
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"AquilaConfig: unknown keys {unknown}; the known ones are {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path):
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self):
        return dataclasses.asdict(self)

    def save(self, path):
        """Writes config.json atomically (a temporary file renamed over the target)."""
        write_text_atomically(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def preset(cls, name):
        if name not in PRESETS:
            raise ValueError(f"AquilaConfig: unknown preset {name!r}; the presets are {sorted(PRESETS)}")
        return cls(**PRESETS[name])


PRESETS = {
    # FlagAI's Aquila-7B: 7,295,537,152 parameters.
    "aquila-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=100008, multiple_of=256, norm_eps=1e-5,
                      max_seq_len=2048),
    # FlagAI never published a 33B shape; this is LLaMA-33B's (dim 6656, 60 layers, 52 heads, SwiGLU 17920 from
    # multiple_of 256) with Aquila's vocabulary.
    "aquila-33b": dict(dim=6656, n_layers=60, n_heads=52, vocab_size=100008, multiple_of=256, norm_eps=1e-5,
                       max_seq_len=2048),
    # About 100M parameters with Aquila's full vocabulary (77M of them in the two embedding tables): for CPU
    # decoding benchmarks.
    "aquila-100m": dict(dim=384, n_layers=12, n_heads=6, vocab_size=100008, multiple_of=64, max_seq_len=1024),
    # Trains in minutes on 2 CPU cores, for the demo corpus and its small tokenizer.
    "demo": dict(dim=256, n_layers=4, n_heads=4, vocab_size=8008, multiple_of=32, max_seq_len=256),
}
