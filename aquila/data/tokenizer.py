"""The bilingual byte-level BPE tokenizer, in Aquila's special-token layout.

Layout (Aquila-7B's, kept relative for smaller vocabularies): the learned tokens first, `<|endoftext|>` at id 0 (also
pad and unk), then eight special tokens in this order: `<|startofpiece|>`, `<|endofpiece|>`, `<|LDWANG|>`, `[MASK]`,
`[gMASK]`, `[sMASK]`, `[CLS]` (BOS) and `</s>` (EOS). With 100,000 learned tokens BOS is 100006, EOS 100007 and the
vocabulary 100008.

Behaviour, stated once:
- encode() never adds BOS or EOS; ask for them (`bos=True`, `eos=True`). Pretraining documents are [BOS] + ids + [EOS];
  the chat template (aquila.model.chat) places its own.
- Text is taken literally: a special token's spelling inside text ("</s>") is encoded as ordinary bytes, so user text
  cannot inject control tokens, and decode(encode(text)) == text for every str that is valid Unicode (Chinese, emoji,
  mixed scripts, control characters, NUL, ...).
- A lone surrogate (a str that is not valid Unicode, e.g. from a JSON "\\ud800" escape) is a ValueError naming its
  position with errors="strict" (the default), or becomes U+FFFD with errors="replace".
- decode() turns ids into bytes, then into text; a byte sequence cut in the middle of a character (a partial
  generation) becomes U+FFFD. StreamDecoder yields whole characters only, for streaming.

Files: `tokenizer.json` (+ `tokenizer_config.json`, `special_tokens_map.json`) loads in transformers'
PreTrainedTokenizerFast / AutoTokenizer with the right special tokens; FlagAI's `vocab.json` + `merges.txt` are written
beside it and load too.
"""

import codecs
import json
import operator
import os
import re
from collections.abc import Iterable, Sequence
from functools import cached_property
from typing import Optional

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as BackendTokenizer

from aquila.files import write_text_atomically

END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = ("<|startofpiece|>", "<|endofpiece|>", "<|LDWANG|>", "[MASK]", "[gMASK]", "[sMASK]", "[CLS]", "</s>")
BOS, EOS = "[CLS]", "</s>"
ERRORS = ("strict", "replace")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def byte_to_unicode() -> dict[int, str]:
    """Byte-level BPE's printable alphabet: bytes that are printable Latin-1 stand for themselves, the others are
    shifted to code points from 256 on, so every byte is one visible character in vocab.json and merges.txt."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def _byte_level_backend(model: models.BPE) -> BackendTokenizer:
    backend = BackendTokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def _add_special_tokens(backend: BackendTokenizer) -> None:
    """Register <|endoftext|> and the eight specials as special tokens: those already in the vocabulary keep their
    ids, the others are appended in the layout's order."""
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                for token in (END_OF_TEXT, *SPECIAL_TOKENS)])
    backend.encode_special_tokens = True  # text is literal: "</s>" typed by a user is not EOS


class Tokenizer:
    def __init__(self, backend: BackendTokenizer):
        self.backend = backend
        missing = [t for t in (END_OF_TEXT, *SPECIAL_TOKENS) if backend.token_to_id(t) is None]
        if missing:
            raise ValueError(f"Tokenizer: the vocabulary lacks the special tokens {missing}")
        self.pad_id = backend.token_to_id(END_OF_TEXT)
        self.bos_id = backend.token_to_id(BOS)
        self.eos_id = backend.token_to_id(EOS)
        self.special_ids = frozenset(backend.token_to_id(t) for t in (END_OF_TEXT, *SPECIAL_TOKENS))

    # --- building, loading, saving -------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 100008, length: Optional[int] = None,
              show_progress: bool = True) -> "Tokenizer":
        """Byte-level BPE with vocab_size - 8 learned tokens (<|endoftext|> and the 256 bytes among them), then
        the eight specials. length (the number of texts, if known) sizes the progress bar."""
        learned = vocab_size - len(SPECIAL_TOKENS)
        if learned < 257 + 1:
            raise ValueError(f"Tokenizer.train: vocab_size must be at least {257 + 1 + len(SPECIAL_TOKENS)} "
                             f"(the 256 bytes, <|endoftext|>, one merge and the 8 specials), got {vocab_size}")
        backend = _byte_level_backend(models.BPE())
        trainer = trainers.BpeTrainer(vocab_size=learned, min_frequency=2, show_progress=show_progress,
                                      special_tokens=[END_OF_TEXT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        seen_text = False

        def noting_text(texts: Iterable[str]) -> Iterable[str]:
            nonlocal seen_text
            for text in texts:
                seen_text = seen_text or bool(text)
                yield text

        backend.train_from_iterator(noting_text(texts), trainer=trainer, length=length)
        if not seen_text:  # the bytes alone, with no merge learned: not a tokenizer anyone wants
            raise ValueError("Tokenizer.train: no text to learn from (the texts are empty)")
        _add_special_tokens(backend)
        return cls(backend)

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        """A directory holding tokenizer.json, or FlagAI's vocab.json + merges.txt; or a tokenizer.json file. A file
        that does not parse is a ValueError naming it."""
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, "tokenizer.json")):
                path = os.path.join(path, "tokenizer.json")
            elif all(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "merges.txt")):
                files = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
                backend = _byte_level_backend(_parsed(lambda: models.BPE.from_file(*files), " + ".join(files)))
                _add_special_tokens(backend)
                return cls._named(backend, path)
            else:
                raise FileNotFoundError(f"Tokenizer.load: {path} holds neither tokenizer.json nor vocab.json + "
                                        "merges.txt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Tokenizer.load: no such file or directory: {path}")
        backend = _parsed(lambda: BackendTokenizer.from_file(path), path)
        backend.encode_special_tokens = True
        return cls._named(backend, path)

    @classmethod
    def _named(cls, backend: BackendTokenizer, path: str) -> "Tokenizer":
        try:
            return cls(backend)
        except ValueError as error:
            raise ValueError(f"Tokenizer.load: {path}: {error}") from None

    def save(self, directory: str) -> None:
        """tokenizer.json with its transformers configs, and FlagAI's vocab.json + merges.txt, into directory (made
        if needed; other files in it, such as a checkpoint's weights, are left alone). Each file is written to a
        temporary name and renamed, so an interrupted save never leaves a half-written file."""
        os.makedirs(directory, exist_ok=True)
        specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": END_OF_TEXT, "unk_token": END_OF_TEXT,
                    "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (BOS, EOS)]}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "add_bos_token": False, "add_eos_token": False, **specials}
        merges = "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in self.merges())
        files = {"tokenizer.json": self.backend.to_str(pretty=True), "merges.txt": merges,
                 **{name: json.dumps(content, ensure_ascii=False, indent=1)
                    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", specials),
                                          ("vocab.json", self.vocabulary()))}}
        for name, text in files.items():
            write_text_atomically(os.path.join(directory, name), text)

    def vocabulary(self) -> dict[str, int]:
        """Token -> id, in id order (so vocab.json is the same file every time)."""
        return dict(sorted(self.backend.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1]))

    def merges(self) -> list[tuple[str, str]]:
        merges = json.loads(self.backend.to_str())["model"]["merges"]
        return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]

    # --- encoding and decoding -----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _valid(self, text: str, errors: str) -> str:
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode: text must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            if errors == "replace":
                return LONE_SURROGATE.sub("\ufffd", text)
            raise ValueError(f"Tokenizer.encode: text has a lone surrogate {text[error.start]!r} at position "
                             f"{error.start} (not valid Unicode); pass errors='replace' to encode it as U+FFFD") \
                from None
        return text

    def encode(self, text: str, bos: bool = False, eos: bool = False, errors: str = "strict") -> list[int]:
        _check_errors(errors)
        ids = self.backend.encode(self._valid(text, errors), add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False,
                     errors: str = "strict") -> list[list[int]]:
        """encode() of many texts, in parallel threads inside the tokenizers library."""
        _check_errors(errors)
        encodings = self.backend.encode_batch([self._valid(t, errors) for t in texts], add_special_tokens=False)
        return [[self.bos_id] * bos + e.ids + [self.eos_id] * eos for e in encodings]

    @cached_property
    def _token_bytes(self) -> list[bytes]:
        to_byte = {char: byte for byte, char in byte_to_unicode().items()}
        table = [b""] * self.vocab_size
        for token, index in self.vocabulary().items():
            if index in self.special_ids:
                table[index] = token.encode("utf-8")
            else:
                table[index] = bytes(to_byte[char] for char in token)
        return table

    def token_bytes(self, token_id: int, skip_special: bool = True) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"Tokenizer: token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        if skip_special and token_id in self.special_ids:
            return b""
        return self._token_bytes[token_id]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """The text of token ids (ints, NumPy or one-element torch integers); a float such as 100.9 is a TypeError
        rather than being truncated to some other token, and an id outside the vocabulary is a ValueError."""
        pieces = []
        for position, token_id in enumerate(ids):
            try:
                token_id = operator.index(token_id)
            except TypeError:
                raise TypeError(f"Tokenizer.decode: ids[{position}] is {token_id!r}, not an integer token id") \
                    from None
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"Tokenizer.decode: ids[{position}] = {token_id} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")
            pieces.append(self.token_bytes(token_id, skip_special))
        return b"".join(pieces).decode("utf-8", errors="replace")


def _check_errors(errors: str) -> None:
    if errors not in ERRORS:
        raise ValueError(f"Tokenizer.encode: errors must be one of {', '.join(map(repr, ERRORS))}, got {errors!r}")


def _parsed(read, path: str):
    """read() of a tokenizer file; the tokenizers library's parse errors (plain Exceptions) as a ValueError naming
    the file."""
    try:
        return read()
    except OSError:
        raise
    except Exception as error:
        raise ValueError(f"Tokenizer.load: {path} is not a valid tokenizer file ({error})") from None


class StreamDecoder:
    """Turns token ids, as they are generated, into text made of whole characters only: bytes of a character that
    is split across tokens are held back until it is complete (Chinese characters take 3 bytes, emoji 4)."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(token_id, self.skip_special))

    def flush(self) -> str:
        """What is left at the end: an incomplete character becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)
