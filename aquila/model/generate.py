"""Generation with a preallocated KV cache: batched prompts of different lengths, greedy or sampled, as token ids
(generate_tokens, generate) or as text streamed in whole characters with stop strings (stream_text, generate_text).
"""

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Optional

import torch
from torch import Tensor

from aquila.data.tokenizer import StreamDecoder
from aquila.model.model import Aquila, KVCache


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 1 keep every token; repetition_penalty > 1 discourages tokens
    already in the sequence (CTRL's rule: positive logits divided by it, negative ones multiplied)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    stop_tokens: Sequence[int] = ()
    seed: Optional[int] = None

    def __post_init__(self):
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):  # NaN passes every comparison below and samples garbage
                raise ValueError(f"Sampling: {name} must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"Sampling: temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"Sampling: top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"Sampling: top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"Sampling: repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"Sampling: need 0 <= min_new_tokens <= max_new_tokens, got {self.min_new_tokens} and "
                             f"{self.max_new_tokens}")


def next_tokens(logits: Tensor, history: Tensor, sampling: Sampling, generator: Optional[torch.Generator],
                allow_stop: bool) -> Tensor:
    """One token per row from logits [batch, vocab]; history [batch, length] (-1 marks padding) feeds the
    repetition penalty."""
    logits = logits.float()
    if sampling.repetition_penalty != 1.0:
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen.scatter_(1, history.clamp(min=0), history >= 0)
        penalised = torch.where(logits > 0, logits / sampling.repetition_penalty,
                                logits * sampling.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if not allow_stop and sampling.stop_tokens:
        logits[:, list(sampling.stop_tokens)] = float("-inf")
    if sampling.temperature == 0:
        return logits.max(-1).indices  # the first maximum, as argmax, in half argmax's time on CPU
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p: a token goes if the mass before it already does.
        drop = cumulative - torch.softmax(sorted_logits, -1) >= sampling.top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probabilities = torch.softmax(logits, -1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)


def fit_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, context: int,
                truncate_prompt: bool = False) -> list[list[int]]:
    """The prompts, checked to leave room for max_new_tokens within the model's context (beyond it the model's
    output is meaningless, not an error): a ValueError when one does not, or with truncate_prompt its last
    context - max_new_tokens tokens (the start of a long prompt matters least for what comes next)."""
    room = context - max_new_tokens
    if room < 1:
        raise ValueError(f"generate: max_new_tokens ({max_new_tokens}) leaves no room for a prompt in the model's "
                         f"context of {context} tokens")
    longest = max(len(p) for p in prompts)
    if longest > room and not truncate_prompt:
        raise ValueError(f"generate: a prompt of {longest} tokens and max_new_tokens ({max_new_tokens}) exceed the "
                         f"model's context of {context} tokens; shorten the prompt, lower max_new_tokens or truncate "
                         "the prompt from the left (truncate_prompt=True)")
    return [list(p)[-room:] for p in prompts]


@torch.no_grad()
def generate_tokens(model: Aquila, prompts: Sequence[Sequence[int]], sampling: Sampling = Sampling(),
                    stop: Optional[Callable[[list[int]], list[bool]]] = None,
                    truncate_prompt: bool = False) -> Iterator[Tensor]:
    """Yields, step by step, the next token of each prompt ([batch] ids; -1 for a sequence that has stopped), until
    every sequence has stopped or max_new_tokens are out. Prompts of different lengths are prefilled one by one into
    a shared cache, then decoded together. stop, given each step's tokens, says which sequences end there (for
    conditions beyond stop tokens, such as stop strings). A prompt that leaves no room for max_new_tokens in the
    model's context is a ValueError, or with truncate_prompt loses its first tokens (see fit_prompts)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate_tokens: prompts must be non-empty lists of token ids")
    prompts = fit_prompts(prompts, sampling.max_new_tokens, model.config.max_seq_len, truncate_prompt)
    embeddings = model.tok_embeddings.weight  # never quantized: the device and dtype of the activations and cache
    device = embeddings.device
    batch = len(prompts)
    longest = max(len(p) for p in prompts)
    cache = KVCache(model.config, batch, longest + sampling.max_new_tokens, device, embeddings.dtype)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    last_logits = []
    for row, prompt in enumerate(prompts):
        prompt = torch.tensor([list(prompt)], device=device)
        logits = model.forward_with_cache(prompt, cache.sequence(row), last_only=True)
        last_logits.append(logits[0, -1])
    logits = torch.stack(last_logits)
    history = torch.full((batch, longest + sampling.max_new_tokens), -1, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        history[row, :len(prompt)] = torch.tensor(list(prompt), device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    decode = model.decoder(cache)
    stop_tokens = torch.tensor(list(sampling.stop_tokens), dtype=torch.long, device=device)
    for step in range(sampling.max_new_tokens):
        tokens = next_tokens(logits, history, sampling, generator, allow_stop=step >= sampling.min_new_tokens)
        tokens = torch.where(active, tokens, torch.full_like(tokens, -1))
        yield tokens
        history[torch.arange(batch, device=device), cache.lengths.long()] = tokens
        if stop_tokens.numel():
            active &= ~torch.isin(tokens, stop_tokens)
        if stop is not None:
            active &= ~torch.tensor(stop(tokens.tolist()), dtype=torch.bool, device=device)
        if not bool(active.any()) or step + 1 == sampling.max_new_tokens:
            return
        # Stopped rows keep decoding a dummy token (their output is masked): one batched step for all.
        logits = decode(tokens.clamp(min=0)[:, None])[:, -1]


def generate(model: Aquila, prompts: Sequence[Sequence[int]], sampling: Sampling = Sampling(),
             truncate_prompt: bool = False) -> list[list[int]]:
    """The new tokens of each prompt (stop tokens included), as lists of ids."""
    outputs = [[] for _ in prompts]
    for tokens in generate_tokens(model, prompts, sampling, truncate_prompt=truncate_prompt):
        for row, token in enumerate(tokens.tolist()):
            if token >= 0:
                outputs[row].append(token)
    return outputs


class _TextStream:
    """One sequence's text as its tokens arrive: whole characters only, held back while the text's end could still
    become a stop string, cut before the first stop string."""

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        self.decoder = StreamDecoder(tokenizer)
        self.stop_strings = [s for s in stop_strings if s]
        self.pending, self.stopped = "", False

    def push(self, token: int) -> str:
        if self.stopped or token < 0:
            return ""
        self.pending += self.decoder.push(token)
        for stop in self.stop_strings:
            if stop in self.pending:
                self.stopped = True
                out, self.pending = self.pending.split(stop, 1)[0], ""
                return out
        held = max((n for s in self.stop_strings for n in range(1, len(s)) if self.pending.endswith(s[:n])),
                   default=0)
        out, self.pending = self.pending[:len(self.pending) - held], self.pending[len(self.pending) - held:]
        return out

    def finish(self) -> str:
        out = "" if self.stopped else self.pending + self.decoder.flush()
        self.pending = ""
        return out


def stream_text(model: Aquila, tokenizer, prompts: Sequence[Sequence[int]], sampling: Sampling = Sampling(),
                stop_strings: Sequence[str] = (), truncate_prompt: bool = False) -> Iterator[list[str]]:
    """Yields, step by step, the new text of each prompt (possibly empty): whole UTF-8 characters only, so Chinese
    never streams broken bytes, and nothing from a stop string on (the sequence ends there). Special tokens are not
    shown; stop tokens end a sequence as in generate_tokens."""
    streams = [_TextStream(tokenizer, stop_strings) for _ in prompts]

    def stopped_by_text(tokens: list[int]) -> list[bool]:
        return [stream.stopped for stream in streams]

    for tokens in generate_tokens(model, prompts, sampling, stop=stopped_by_text if stop_strings else None,
                                  truncate_prompt=truncate_prompt):
        yield [stream.push(token) for stream, token in zip(streams, tokens.tolist())]
    yield [stream.finish() for stream in streams]


def generate_text(model: Aquila, tokenizer, prompts: Sequence[Sequence[int]], sampling: Sampling = Sampling(),
                  stop_strings: Sequence[str] = (), truncate_prompt: bool = False) -> list[str]:
    """The new text of each prompt, up to (not including) the first stop string."""
    texts = [""] * len(prompts)
    for pieces in stream_text(model, tokenizer, prompts, sampling, stop_strings, truncate_prompt):
        texts = [text + piece for text, piece in zip(texts, pieces)]
    return texts
