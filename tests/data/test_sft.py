"""aquila.data.sft: loading FlagAI conversation files, label masking, truncation, and padded vs packed batches."""

import json
import os

import pytest
import torch

from aquila import IGNORE_INDEX
from aquila.data.sft import Conversation, SFTDataset, first_fit, fit_to_length, load_conversations, pack
from aquila.model.chat import DEFAULT_SYSTEM, Message, render
from aquila.model.config import AquilaConfig
from aquila.model.model import Aquila

DEMO_CHAT = os.path.join(os.path.dirname(__file__), "..", "..", "aquila", "data", "demo", "chat.jsonl")


def conversation(*texts, system=None):
    """A Conversation from alternating human and assistant texts."""
    return Conversation(tuple(Message("human" if i % 2 == 0 else "gpt", text) for i, text in enumerate(texts)),
                        system)


def record(*texts, **extra):
    return {"conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": text}
                              for i, text in enumerate(texts)], **extra}


def write_jsonl(path, lines):
    path.write_text("".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines),
                    encoding="utf-8")
    return str(path)


def learned_text(tokenizer, sample):
    targets = sample["targets"]
    return tokenizer.decode(targets[targets != IGNORE_INDEX], skip_special=False)


# --- loading -------------------------------------------------------------------------------------------------------

def test_load_conversations(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"id": "a", **record("你好", "你好！有什么可以帮你？", "Say hi", "hi"), "instruction": "Be brief."},
        "\n",
        record("q", "a", system="From the system key."),
        record("q", "a", instruction=""),  # empty: no system of its own
    ])
    first, second, third = load_conversations(path)
    assert first.messages == (Message("human", "你好"), Message("gpt", "你好！有什么可以帮你？"),
                              Message("human", "Say hi"), Message("gpt", "hi"))
    assert (first.system, first.id, first.source, first.line) == ("Be brief.", "a", path, 1)
    assert first.location == f"{path}:1"
    assert (second.system, second.id, second.line) == ("From the system key.", None, 3)
    assert third.system is None


BAD_RECORDS = [
    ('{"conversations": [\n', r"invalid JSON"),
    ("[1, 2]\n", r"expected a JSON object, got list"),
    ({"id": 1}, r"missing 'conversations'"),
    ({"conversations": "hello"}, r"'conversations' must be a list of turns, got str"),
    ({"conversations": []}, r"'conversations' is empty"),
    ({"conversations": ["hello", "there"]}, r"conversations\[0\] must be an object"),
    ({"conversations": [{"value": "q"}, {"from": "gpt", "value": "a"}]}, r"conversations\[0\] lacks 'from'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}, r"conversations\[1\] lacks 'value'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "assistant", "value": "a"}]},
     r"conversations\[1\] has unknown role 'assistant'"),
    ({"conversations": [{"from": ["human"], "value": "q"}]}, r"conversations\[0\] has unknown role \['human'\]"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 42}]},
     r"conversations\[1\]\.value must be a string, got int"),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
     r"conversations: message 0 must be from 'human'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}]},
     r"conversations: message 1 must be from 'gpt'"),
    (record("q", "a", "a trailing question"), r"conversations: a training conversation must end with a 'gpt' message"),
    (record("q", "a", instruction="one", system="two"), r"has both 'instruction' and 'system'"),
    (record("q", "a", instruction=["not", "text"]), r"'instruction' must be a string, got list"),
    ('{"conversations": [{"from": "human", "value": "bad \\ud800"}, {"from": "gpt", "value": "a"}]}\n',
     r"conversations\[0\]\.value has a lone surrogate '\\ud800' at position 4"),
]


@pytest.mark.parametrize("bad, message", BAD_RECORDS, ids=[m for _, m in BAD_RECORDS])
def test_malformed_records_name_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "chat.jsonl", [record("q", "a"), "\n", bad, record("q", "a")])
    with pytest.raises(ValueError, match=rf"chat\.jsonl:3: {message}"):
        load_conversations(path)


def test_lone_surrogates_can_be_replaced(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        '{"conversations": [{"from": "human", "value": "bad \\ud800"}, {"from": "gpt", "value": "a"}], '
        '"instruction": "\\udfff"}\n'])
    (loaded,) = load_conversations(path, errors="replace")
    assert loaded.messages[0].text == "bad \ufffd" and loaded.system == "\ufffd"
    with pytest.raises(ValueError, match="errors"):
        load_conversations(path, errors="ignore")


# --- rendering and masking -----------------------------------------------------------------------------------------

def test_label_masking(small_tokenizer):
    tokenizer = small_tokenizer
    chat = conversation("What is 床前明月光?", "A poem 😀.", "And in English?", "Moonlight before my bed.",
                        system="You translate.")
    dataset = SFTDataset([chat], tokenizer, max_len=1000)
    sample = dataset[0]
    rendered = render(tokenizer, chat.messages, chat.system)
    tokens, targets = sample["tokens"].tolist(), sample["targets"].tolist()
    assert tokens == rendered.ids[:-1]
    assert targets == [token if learned else IGNORE_INDEX for token, learned in zip(rendered.ids[1:],
                                                                                   rendered.learn[1:])]
    assert sample["tokens"].dtype == sample["targets"].dtype == torch.int64
    # The learned targets are exactly the answers, each with the separator, then EOS; BOS is never a target.
    assert learned_text(tokenizer, sample) == " A poem 😀.### Moonlight before my bed.###</s>"
    assert targets[-1] == tokenizer.eos_id and tokens[0] == tokenizer.bos_id
    unlearned = tokenizer.decode([t for t, y in zip(rendered.ids[1:], targets) if y == IGNORE_INDEX])
    assert unlearned == "You translate.###Human: What is 床前明月光?###Assistant:Human: And in English?###Assistant:"
    assert dataset.stats == {"conversations": 1, "kept": 1, "truncated_turns": 0, "dropped_exchanges": 0,
                             "truncated_answers": 0, "skipped": 0}


def test_system_precedence(small_tokenizer):
    """The conversation's own system, else the dataset's, else the template's DEFAULT_SYSTEM."""
    own, plain = conversation("q", "a", system="Own."), conversation("q", "a")
    with_default = SFTDataset([own, plain], small_tokenizer, max_len=1000, system="Dataset default.")
    texts = [small_tokenizer.decode(with_default[i]["tokens"]) for i in range(2)]
    assert texts[0].startswith("Own.###Human: q") and texts[1].startswith("Dataset default.###Human: q")
    template_default = SFTDataset([plain], small_tokenizer, max_len=1000)
    assert small_tokenizer.decode(template_default[0]["tokens"]).startswith(DEFAULT_SYSTEM + "###Human: q")


def test_instruction_is_the_system(small_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [record("q", "a", instruction="You are a poet.")])
    dataset = SFTDataset(load_conversations(path), small_tokenizer, max_len=1000, system="unused")
    assert small_tokenizer.decode(dataset[0]["tokens"]) == "You are a poet.###Human: q###Assistant: a###"


# --- truncation ----------------------------------------------------------------------------------------------------

THREE_EXCHANGES = conversation("First question?", "First answer, rather long.", "Second?", "Second answer.",
                               "Third?", "Third answer.", system="S.")


def test_shorter_conversation_is_a_slice(small_tokenizer):
    """fit_to_length renders the first k exchanges by slicing; that is exactly render of the shorter conversation."""
    full = render(small_tokenizer, THREE_EXCHANGES.messages, "S.")
    for kept in (1, 2):
        shorter = render(small_tokenizer, THREE_EXCHANGES.messages[:2 * kept], "S.")
        fitted = fit_to_length(full, len(shorter.ids) - 1, small_tokenizer.eos_id)
        assert (fitted.ids, fitted.learn, fitted.outcome) == (shorter.ids, shorter.learn, "truncated_turns")
        assert fitted.dropped_exchanges == 3 - kept


def test_truncation_cases(small_tokenizer):
    tokenizer = small_tokenizer
    full = render(tokenizer, THREE_EXCHANGES.messages, "S.")
    two = render(tokenizer, THREE_EXCHANGES.messages[:4], "S.")
    one = render(tokenizer, THREE_EXCHANGES.messages[:2], "S.")
    prompt = render(tokenizer, THREE_EXCHANGES.messages[:1], "S.", generation=True)  # BOS ... "Assistant:"

    def sample_at(max_len):
        dataset = SFTDataset([THREE_EXCHANGES], tokenizer, max_len)
        return dataset, (dataset[0] if len(dataset) else None)

    dataset, sample = sample_at(len(full.ids) - 1)  # fits exactly
    assert sample["tokens"].tolist() == full.ids[:-1] and dataset.stats["truncated_turns"] == 0
    dataset, sample = sample_at(len(full.ids) - 2)  # one token short: the third exchange goes
    assert sample["tokens"].tolist() == two.ids[:-1]
    assert learned_text(tokenizer, sample) == " First answer, rather long.### Second answer.###</s>"
    assert (dataset.stats["truncated_turns"], dataset.stats["dropped_exchanges"]) == (1, 1)
    dataset, sample = sample_at(len(one.ids) - 1)
    assert sample["tokens"].tolist() == one.ids[:-1] and dataset.stats["dropped_exchanges"] == 2
    # The first exchange does not fit: its answer is cut, the prompt kept, and no EOS is learned.
    dataset, sample = sample_at(len(one.ids) - 4)
    assert sample["tokens"].tolist() == one.ids[:len(one.ids) - 4]
    assert dataset.stats["truncated_answers"] == 1 and dataset.stats["truncated_turns"] == 0
    answer = learned_text(tokenizer, sample)
    assert " First answer, rather long.###".startswith(answer) and len(answer) > 0
    assert tokenizer.eos_id not in sample["targets"].tolist()
    # Exactly the prompt: one answer token is still learned.
    dataset, sample = sample_at(len(prompt.ids))
    assert (sample["targets"] != IGNORE_INDEX).sum() == 1 and sample["targets"][-1] == one.ids[len(prompt.ids)]
    # One token less and nothing could be learned: skipped, not a crash.
    dataset, sample = sample_at(len(prompt.ids) - 1)
    assert sample is None and len(dataset) == 0
    assert dataset.stats["skipped"] == 1 and dataset.skipped == ["conversation None"]
    assert "1 skipped" in dataset.describe()


def test_every_max_len_gives_a_valid_sample_or_a_skip(small_tokenizer):
    full = render(small_tokenizer, THREE_EXCHANGES.messages, "S.")
    for max_len in range(1, len(full.ids) + 2):
        dataset = SFTDataset([THREE_EXCHANGES], small_tokenizer, max_len)
        assert dataset.stats["kept"] + dataset.stats["skipped"] == 1
        if len(dataset):
            sample = dataset[0]
            assert 0 < len(sample["tokens"]) <= max_len
            assert (sample["targets"] != IGNORE_INDEX).any()
            assert sample["tokens"].tolist() == full.ids[:len(sample["tokens"])]  # always a prefix of the prompt


def test_dataset_stats_over_mixed_lengths(small_tokenizer, tmp_path):
    long_answer = "很长的回答。" * 30
    conversations = [conversation("q", "a", system="S."), THREE_EXCHANGES,
                     conversation("q", long_answer, system="S."), conversation("问" * 200, "a", system="S.")]
    dataset = SFTDataset(conversations, small_tokenizer, max_len=60)
    assert dataset.stats == {"conversations": 4, "kept": 3, "truncated_turns": 1, "dropped_exchanges": 2,
                             "truncated_answers": 1, "skipped": 1}
    assert len(dataset) == 3 and dataset.lengths().max() <= 60
    assert dataset.conversations == conversations[:3]
    with pytest.raises(ValueError, match="max_len"):
        SFTDataset(conversations, small_tokenizer, max_len=0)


# --- batching ------------------------------------------------------------------------------------------------------

def test_first_fit():
    assert first_fit([5, 3, 4, 2], 8) == [[0, 1], [2, 3]]
    assert first_fit([6, 5, 2, 3], 8) == [[0, 2], [1, 3]]
    assert first_fit([8, 1], 8) == [[0], [1]]
    with pytest.raises(ValueError, match="sample 1 has 9 tokens, more than seq_len 8"):
        first_fit([3, 9], 8)


def fake_sample(length, start):
    tokens = torch.arange(start, start + length)
    targets = tokens + 1
    targets[: length // 2] = IGNORE_INDEX
    return {"tokens": tokens, "targets": targets}


def pad_collate(samples, pad_id: int) -> dict:
    """tokens and targets int64 [batch, longest sample], each row padded at its end: tokens with pad_id, targets
    with IGNORE_INDEX. With causal attention the padding after a sample cannot change what the sample's tokens see,
    so no mask or positions are needed."""
    longest = max(len(sample["tokens"]) for sample in samples)
    tokens = torch.full((len(samples), longest), pad_id, dtype=torch.int64)
    targets = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.int64)
    for row, sample in enumerate(samples):
        length = len(sample["tokens"])
        tokens[row, :length] = sample["tokens"]
        targets[row, :length] = sample["targets"]
    return {"tokens": tokens, "targets": targets}


def test_pad_collate():
    samples = [fake_sample(3, 10), fake_sample(5, 20)]
    batch = pad_collate(samples, pad_id=7)
    assert batch["tokens"].tolist() == [[10, 11, 12, 7, 7], [20, 21, 22, 23, 24]]
    ignored = IGNORE_INDEX
    assert batch["targets"].tolist() == [[ignored, 12, 13, ignored, ignored], [ignored, ignored, 23, 24, 25]]


def test_pack_layout_and_cu_seqlens():
    lengths = [5, 3, 6, 2, 8, 1]
    samples = [fake_sample(length, 100 * number) for number, length in enumerate(lengths)]
    seq_len = 8
    batch = pack(samples, seq_len, pad_id=0)
    rows = first_fit(lengths, seq_len)  # [[0, 1], [2, 3], [4], [5]]
    assert rows == [[0, 1], [2, 3], [4], [5]]
    tokens, targets, positions, cu_seqlens = (batch[k] for k in ("tokens", "targets", "positions", "cu_seqlens"))
    assert tokens.shape == targets.shape == positions.shape == (len(rows), seq_len)
    assert tokens.dtype == targets.dtype == positions.dtype == torch.int64 and cu_seqlens.dtype == torch.int32
    sequence_lengths = torch.diff(cu_seqlens).tolist()
    assert sequence_lengths == [5, 3, 6, 2, 8, 1, 7]  # the last row's padding is a sequence of its own
    assert cu_seqlens[0] == 0 and cu_seqlens[-1] == tokens.numel() and min(sequence_lengths) > 0
    assert all(row * seq_len in cu_seqlens.tolist() for row in range(len(rows) + 1))  # no sequence spans rows
    flat_tokens, flat_targets, flat_positions = tokens.view(-1), targets.view(-1), positions.view(-1)
    order = [index for row in rows for index in row]
    for sequence, (start, stop) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        assert flat_positions[start:stop].tolist() == list(range(stop - start))
        if sequence < len(order):
            sample = samples[order[sequence]]
            assert torch.equal(flat_tokens[start:stop], sample["tokens"])
            assert torch.equal(flat_targets[start:stop], sample["targets"])
        else:
            assert (flat_targets[start:stop] == IGNORE_INDEX).all() and (flat_tokens[start:stop] == 0).all()
    with pytest.raises(ValueError, match="more than seq_len"):
        pack(samples, 7)


@pytest.fixture(scope="module")
def chat_dataset(small_tokenizer):
    texts = ["床前明月光", "The quick brown fox.", "Tokenizers split text 😀", "疑是地上霜。举头望明月",
             "json decoder", "a", "低头思故乡 and home", "lazy dog jumps over the brown fox quickly"]
    conversations = [conversation(texts[i], texts[(i + 1) % 8], *((texts[(i + 3) % 8], texts[i]) if i % 3 else ()),
                                  system="S.")
                     for i in range(8)]
    return SFTDataset(conversations, small_tokenizer, max_len=64)


def test_pack_and_pad_give_the_same_loss(chat_dataset, small_tokenizer):
    """The mean loss over all learned targets is the same from padded batches and from packed rows: packed
    conversations do not see each other, and padding changes nothing."""
    config = AquilaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=small_tokenizer.vocab_size, multiple_of=16,
                          max_seq_len=128)
    model = Aquila(config).eval()
    samples = [chat_dataset[i] for i in range(len(chat_dataset))]
    learned = [int((s["targets"] != IGNORE_INDEX).sum()) for s in samples]
    with torch.no_grad():
        # Padded, in two batches: their token-weighted mean.
        padded_sum = 0.0
        for part in (slice(0, 3), slice(3, None)):
            batch = pad_collate(samples[part], small_tokenizer.pad_id)
            padded_sum += model(batch["tokens"], batch["targets"]) * sum(learned[part])
        padded = padded_sum / sum(learned)
        packed_batch = pack(samples, seq_len=96, pad_id=small_tokenizer.pad_id)
        assert packed_batch["tokens"].shape[0] < len(samples)  # several conversations share rows
        packed = model(packed_batch["tokens"], packed_batch["targets"], positions=packed_batch["positions"],
                       cu_seqlens=packed_batch["cu_seqlens"])
        leaky = model(packed_batch["tokens"], packed_batch["targets"])  # no cu_seqlens: conversations see each other
        summed = model(packed_batch["tokens"], packed_batch["targets"], positions=packed_batch["positions"],
                       cu_seqlens=packed_batch["cu_seqlens"], num_tokens=1.0)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(summed, padded * sum(learned), rtol=1e-5, atol=1e-4)
    assert not torch.allclose(leaky, padded, rtol=1e-4, atol=0)  # the comparison can tell


# --- the bundled demo set ------------------------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.isfile(DEMO_CHAT), reason="aquila/data/demo/chat.jsonl is not built")
def test_demo_chat_set_loads_and_renders(small_tokenizer):
    conversations = load_conversations(DEMO_CHAT)
    assert len(conversations) > 100
    dataset = SFTDataset(conversations, small_tokenizer, max_len=4096)
    assert dataset.stats["skipped"] == 0 and len(dataset) == len(conversations)
    for index in range(0, len(dataset), 37):
        sample = dataset[index]
        assert (sample["targets"] != IGNORE_INDEX).any()
        assert learned_text(small_tokenizer, sample).endswith("###</s>")
