"""Supervised fine-tuning data: FlagAI's conversation files, rendered with the one chat template, masked, truncated
and batched (padded or packed).

Input: JSON lines (optionally .gz/.xz), one conversation a line, in FlagAI's SFT format:

    {"id": ..., "conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}, ...],
     "instruction": "..."}

"instruction" (or "system", which some FlagAI files use; not both) is the conversation's system text; absent, null
or empty, the dataset's default system is used, else the template's DEFAULT_SYSTEM. Turns alternate human, gpt,
human, ..., starting with the human and ending with the assistant: a trailing human turn has no answer to learn, and
silently dropping it would hide a broken record, so it is an error like every other malformed record, reported with
the file and line.

Tokens: aquila.model.chat.render gives the ids and, per token, whether the model learns it (the answers with their
"###", and the final EOS). A sample is the next-token pair inputs = ids[:-1], targets = ids[1:], with a target set to
IGNORE_INDEX (ignored by the loss) wherever its token is not learned (BOS, system, human turns, the "Assistant:" cues).

Length: a sample has at most max_len input tokens. A conversation that is too long keeps its first exchanges (human
question + assistant answer) that fit, whole, ending with EOS as a shorter conversation would; if even the first
exchange does not fit, its answer is cut at max_len (no EOS: the model must not learn to stop mid-answer); if the
prompt of the first exchange alone does not fit, no answer token could be learned and the conversation is skipped.
Nothing raises for length; SFTDataset.stats counts each case.

Batching: pack lays several samples into each row of seq_len tokens (first fit), with positions and cu_seqlens in the
format of aquila.data.packing.collate so that packed conversations do not attend to each other: the loss is the mean
over the same learned targets as from batches of the samples padded to their longest.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from aquila import IGNORE_INDEX
from aquila.data.documents import read_json_lines
from aquila.data.tokenizer import LONE_SURROGATE
from aquila.model.chat import ROLES, Message, Rendered, check_turns, render

SYSTEM_KEYS = ("instruction", "system")


@dataclasses.dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    system: Optional[str] = None  # None: the dataset's default system, else the template's
    id: Any = None  # the record's "id", whatever JSON value it holds
    source: Optional[str] = None  # the file and line the conversation was read from, for messages
    line: Optional[int] = None

    @property
    def location(self) -> str:
        if self.source is None:
            return f"conversation {self.id!r}"
        return f"{self.source}:{self.line}"


def _checked_text(value: Any, what: str, where: str, errors: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: {what} must be a string, got {type(value).__name__}")
    surrogate = LONE_SURROGATE.search(value)
    if surrogate is not None:
        # The tokenizer would refuse it at render time, far from the record; say which record here instead.
        if errors != "replace":
            raise ValueError(f"{where}: {what} has a lone surrogate {surrogate.group()!r} at position "
                             f"{surrogate.start()} (not valid Unicode); fix the record, or load with "
                             f"errors='replace' to read it as U+FFFD")
        value = LONE_SURROGATE.sub("\ufffd", value)
    return value


def conversation_from_record(record: dict[str, Any], source: Optional[str] = None, line: Optional[int] = None,
                             errors: str = "strict") -> Conversation:
    """A validated Conversation from one parsed record; source and line (where it was read) start every error
    message."""
    where = f"{source}:{line}" if source is not None else "conversation"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    turns = record.get("conversations")
    if turns is None:
        raise ValueError(f"{where}: missing 'conversations' (a list of {{\"from\", \"value\"}} turns)")
    if not isinstance(turns, list):
        raise ValueError(f"{where}: 'conversations' must be a list of turns, got {type(turns).__name__}")
    if not turns:
        raise ValueError(f"{where}: 'conversations' is empty")
    messages = []
    for index, turn in enumerate(turns):
        what = f"conversations[{index}]"
        if not isinstance(turn, dict):
            raise ValueError(f"{where}: {what} must be an object with 'from' and 'value', got "
                             f"{type(turn).__name__}")
        missing = [key for key in ("from", "value") if key not in turn]
        if missing:
            raise ValueError(f"{where}: {what} lacks {' and '.join(repr(key) for key in missing)}")
        role = turn["from"]
        if not isinstance(role, str) or role not in ROLES:
            raise ValueError(f"{where}: {what} has unknown role {role!r}; 'from' must be one of {sorted(ROLES)}")
        messages.append(Message(role, _checked_text(turn["value"], f"{what}.value", where, errors)))
    try:
        check_turns(messages, generation=False)  # the template's own rule, so loading and rendering agree
    except ValueError as error:
        raise ValueError(f"{where}: conversations: {str(error).removeprefix('chat: ')}") from None
    present = [key for key in SYSTEM_KEYS if record.get(key) is not None]
    if len(present) > 1:
        raise ValueError(f"{where}: has both 'instruction' and 'system'; give the system text under one of them")
    system = _checked_text(record[present[0]], repr(present[0]), where, errors) if present else None
    return Conversation(tuple(messages), system or None, record.get("id"), source, line)


def load_conversations(path: str, errors: str = "strict") -> list[Conversation]:
    """Every conversation of a FlagAI SFT file (JSON lines; blank lines are skipped), validated; the first
    malformed record is a ValueError naming the file and line. errors="replace" reads lone surrogates (invalid
    Unicode) as U+FFFD instead of failing."""
    if errors not in ("strict", "replace"):
        raise ValueError(f"load_conversations: errors must be 'strict' or 'replace', got {errors!r}")
    return [conversation_from_record(record, path, number, errors)
            for number, record in read_json_lines(path)]


# --- fitting a rendered conversation into max_len -------------------------------------------------------------------

def learned_runs(learn: Sequence[bool]) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of learned tokens: one per answer, the last one with the EOS."""
    runs, start = [], None
    for position, learned in enumerate(learn):
        if learned and start is None:
            start = position
        elif not learned and start is not None:
            runs.append((start, position))
            start = None
    if start is not None:
        runs.append((start, len(learn)))
    return runs


@dataclasses.dataclass
class Fitted:
    ids: list[int]
    learn: list[bool]
    outcome: str  # "whole", "truncated_turns", "truncated_answer" or "skipped" (ids and learn then empty)
    dropped_exchanges: int = 0


def fit_to_length(rendered: Rendered, max_len: int, eos_id: int) -> Fitted:
    """The rendered conversation cut to at most max_len input tokens (max_len + 1 tokens), as the module docstring
    describes.

    Keeping the first k exchanges is rendered here by slicing: the template encodes every piece on its own, so the
    rendering of the first k exchanges is the full rendering up to the end of answer k, then EOS (a test checks this
    against render of the shorter conversation). Answer k ends where the k-th run of learned tokens ends."""
    ids, learn = rendered.ids, rendered.learn
    token_limit = max_len + 1  # inputs are ids[:-1]
    if len(ids) <= token_limit:
        return Fitted(list(ids), list(learn), "whole")
    answers = learned_runs(learn)
    exchanges = len(answers)
    for kept in range(exchanges - 1, 0, -1):
        end = answers[kept - 1][1]
        if end + 1 <= token_limit:  # + 1: the EOS that closes the shorter conversation
            return Fitted(list(ids[:end]) + [eos_id], list(learn[:end]) + [True], "truncated_turns",
                          exchanges - kept)
    first_answer_start = answers[0][0]
    if first_answer_start < token_limit:  # at least the first answer token is a target
        return Fitted(list(ids[:token_limit]), list(learn[:token_limit]), "truncated_answer", exchanges - 1)
    return Fitted([], [], "skipped", exchanges)


class SFTDataset(torch.utils.data.Dataset):
    """Conversations rendered, fitted to max_len input tokens and masked for SFT. Item i is a dict: ``tokens``
    int64 [n] (the inputs, n <= max_len) and ``targets`` int64 [n] (the next tokens, IGNORE_INDEX where not learned).

    system: the system text of conversations that have none of their own (None: the template's DEFAULT_SYSTEM).
    ``stats`` counts conversations: kept (in the dataset, whole or cut), truncated_turns (later exchanges dropped),
    dropped_exchanges (exchanges those kept lost, by either cut), truncated_answers (the first answer cut),
    skipped (the first prompt alone is longer than max_len); ``skipped`` lists where those came from.
    """

    def __init__(self, conversations: Sequence[Conversation], tokenizer, max_len: int,
                 system: Optional[str] = None):
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"SFTDataset: max_len must be a positive int, got {max_len!r}")
        self.max_len = max_len
        self.conversations: list[Conversation] = []
        self.skipped: list[str] = []
        self._ids: list[np.ndarray] = []
        self._learn: list[np.ndarray] = []
        self.stats = {"conversations": 0, "kept": 0, "truncated_turns": 0, "dropped_exchanges": 0,
                      "truncated_answers": 0, "skipped": 0}
        dtype = np.int32 if tokenizer.vocab_size <= np.iinfo(np.int32).max else np.int64  # half the memory
        for conversation in conversations:
            self.stats["conversations"] += 1
            rendered = render(tokenizer, conversation.messages,
                              conversation.system if conversation.system is not None else system)
            fitted = fit_to_length(rendered, max_len, tokenizer.eos_id)
            if fitted.outcome == "skipped":
                self.stats["skipped"] += 1
                self.skipped.append(conversation.location)
                continue
            if fitted.outcome == "truncated_turns":
                self.stats["truncated_turns"] += 1
            elif fitted.outcome == "truncated_answer":
                self.stats["truncated_answers"] += 1
            self.stats["kept"] += 1
            self.stats["dropped_exchanges"] += fitted.dropped_exchanges
            self.conversations.append(conversation)
            self._ids.append(np.asarray(fitted.ids, dtype=dtype))
            self._learn.append(np.asarray(fitted.learn, dtype=bool))

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        ids = torch.from_numpy(self._ids[index].astype(np.int64))
        learn = torch.from_numpy(self._learn[index])
        targets = torch.where(learn[1:], ids[1:], torch.tensor(IGNORE_INDEX))
        return {"tokens": ids[:-1], "targets": targets}

    def largest_token_id(self) -> int:
        """The largest token id of any sample (-1 for an empty dataset)."""
        return max((int(ids.max()) for ids in self._ids), default=-1)

    def lengths(self) -> np.ndarray:
        """Input tokens of each sample (for length-aware batching and packing)."""
        return np.fromiter((len(ids) - 1 for ids in self._ids), dtype=np.int64, count=len(self._ids))

    def describe(self) -> str:
        s = self.stats
        text = f"{s['kept']:,} of {s['conversations']:,} conversations kept (max_len {self.max_len})"
        if s["truncated_turns"]:
            text += f"; {s['truncated_turns']:,} lost their later exchanges ({s['dropped_exchanges']:,} in all)"
        if s["truncated_answers"]:
            text += f"; {s['truncated_answers']:,} had their first answer cut"
        if s["skipped"]:
            text += f"; {s['skipped']:,} skipped, their first prompt alone is longer (first: {self.skipped[0]})"
        return text


# --- batching ---------------------------------------------------------------------------------------------------

def _checked_samples(samples: Sequence[dict[str, Tensor]]) -> None:
    if len(samples) == 0:
        raise ValueError("pack: samples is empty")
    for number, sample in enumerate(samples):
        if sample["tokens"].shape != sample["targets"].shape or sample["tokens"].dim() != 1:
            raise ValueError(f"pack: sample {number}: tokens and targets must be 1-D of one length, got shapes "
                             f"{tuple(sample['tokens'].shape)} and {tuple(sample['targets'].shape)}")
        if len(sample["tokens"]) == 0:
            raise ValueError(f"pack: sample {number} is empty")


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Sample indices per row: each length, in order, goes into the first row with room left, else a new row. Meant
    for one batch of samples (it compares against every open row)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index, length in enumerate(lengths):
        if length > capacity:
            raise ValueError(f"pack: sample {index} has {length} tokens, more than seq_len {capacity}")
        for row, left in enumerate(room):
            if length <= left:
                rows[row].append(index)
                room[row] -= length
                break
        else:
            rows.append([index])
            room.append(capacity - length)
    return rows


def pack(samples: Sequence[dict[str, Tensor]], seq_len: int, pad_id: int = 0) -> dict[str, Tensor]:
    """The samples packed first-fit into rows of seq_len tokens, in aquila.data.packing.collate's format:
    tokens, targets and positions int64 [rows, seq_len], cu_seqlens int32 [sequences + 1] over the flattened
    batch. Each sample is a sequence of its own (positions from 0, attending to itself alone); the rest of a row is
    padding, one more sequence whose targets are all IGNORE_INDEX."""
    _checked_samples(samples)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"pack: seq_len must be a positive int, got {seq_len!r}")
    rows = first_fit([len(sample["tokens"]) for sample in samples], seq_len)
    tokens = torch.full((len(rows), seq_len), pad_id, dtype=torch.int64)
    targets = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.int64)
    positions = torch.empty((len(rows), seq_len), dtype=torch.int64)
    sequence_lengths = []
    for row, members in enumerate(rows):
        filled = 0
        for index in members:
            sample = samples[index]
            length = len(sample["tokens"])
            tokens[row, filled:filled + length] = sample["tokens"]
            targets[row, filled:filled + length] = sample["targets"]
            positions[row, filled:filled + length] = torch.arange(length)
            sequence_lengths.append(length)
            filled += length
        if filled < seq_len:  # the padding: a sequence of its own, so no sample attends to it
            positions[row, filled:] = torch.arange(seq_len - filled)
            sequence_lengths.append(seq_len - filled)
    cu_seqlens = torch.zeros(len(sequence_lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(sequence_lengths), 0)
    return {"tokens": tokens, "targets": targets, "positions": positions, "cu_seqlens": cu_seqlens}
