"""Packing documents into samples, the cached index, blending, splitting and collation.

The expected streams, document boundaries and position ids are recomputed here token by token from the documents'
known contents, independently of the vectorised index the dataset builds."""

import os
import time

import numpy as np
import pytest
import torch

from aquila.data import packing
from aquila.data.indexed import IndexedDataset, IndexedDatasetWriter
from aquila.data.packing import (
    BlendedDataset,
    PackedDataset,
    blending_indices,
    build_packing_index,
    collate,
    split_documents,
)
from aquila.model.config import AquilaConfig
from aquila.model.model import Aquila

LENGTHS = [5, 0, 12, 1, 7, 30, 0, 3, 9, 2, 16, 4]  # two empty documents, which packing skips


def document_tokens(document, length):
    """Token ids that say which document and position they come from."""
    return document * 100 + np.arange(length)


def write_corpus(prefix, lengths, contents=document_tokens):
    documents = [contents(document, length) for document, length in enumerate(lengths)]
    with IndexedDatasetWriter(str(prefix), np.int32) as writer:
        for tokens in documents:
            writer.add_document(tokens)
    return IndexedDataset(str(prefix)), documents


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus", LENGTHS)


def stream_of(dataset, documents, eos_id=None):
    """The token stream the samples should cut, and for each token its document's place in the stream."""
    tokens, stream_document = [], []
    for place, document in enumerate(dataset.document_order):
        pieces = list(documents[document]) + ([] if eos_id is None else [eos_id])
        tokens += pieces
        stream_document += [place] * len(pieces)
    return np.array(tokens), np.array(stream_document)


def expected_positions_and_pieces(stream_document, sample, seq_len):
    """Position ids of a sample's input tokens and the lengths of its document pieces, token by token: a piece
    starts at the sample's first token and wherever the stream document changes."""
    positions, pieces = [], []
    for token in range(sample * seq_len, (sample + 1) * seq_len):
        if token == sample * seq_len or stream_document[token] != stream_document[token - 1]:
            pieces.append(0)
        positions.append(pieces[-1])
        pieces[-1] += 1
    return positions, pieces


def check_against_the_stream(dataset, documents, eos_id=None):
    stream, stream_document = stream_of(dataset, documents, eos_id)
    seq_len, num_samples = dataset.seq_len, dataset.num_samples
    assert len(stream) >= num_samples * seq_len + 1
    rebuilt = []
    for sample in range(num_samples):
        item = dataset.stream_sample(sample)
        assert item["tokens"].dtype == torch.int64 and item["tokens"].shape == (seq_len + 1,)
        np.testing.assert_array_equal(item["tokens"], stream[sample * seq_len:(sample + 1) * seq_len + 1])
        positions, pieces = expected_positions_and_pieces(stream_document, sample, seq_len)
        np.testing.assert_array_equal(item["positions"], positions)
        np.testing.assert_array_equal(item["doc_lengths"], pieces)
        assert item["positions"].dtype == torch.int64 and item["doc_lengths"].dtype == torch.int64
        rebuilt += item["tokens"].tolist()[:-1]  # drop the token the next sample starts with
    rebuilt.append(item["tokens"][-1].item())
    np.testing.assert_array_equal(rebuilt, stream[:num_samples * seq_len + 1])


def epochs_of(dataset, documents):
    non_empty = [d for d in range(len(documents)) if len(documents[d])]
    order = list(dataset.document_order)
    return [order[start:start + len(non_empty)] for start in range(0, len(order), len(non_empty))], non_empty


def test_samples_cut_the_shuffled_document_stream(corpus):
    indexed, documents = corpus
    dataset = PackedDataset(indexed, seq_len=7, num_samples=30, seed=1)
    assert len(dataset) == 30 and dataset.num_epochs == 3  # 89 tokens an epoch, 211 needed
    check_against_the_stream(dataset, documents)
    epochs, non_empty = epochs_of(dataset, documents)
    assert len(epochs) == 3
    for epoch in epochs[:-1]:
        assert sorted(epoch) == non_empty
    assert len(set(epochs[-1])) == len(epochs[-1]) and set(epochs[-1]) <= set(non_empty)
    assert epochs[0] != non_empty and epochs[0] != epochs[1]  # shuffled, and afresh each epoch
    # The samples themselves are visited in a shuffled order: each stream sample exactly once.
    items = [dataset[i]["tokens"].tolist() for i in range(len(dataset))]
    stream_samples = [dataset.stream_sample(j)["tokens"].tolist() for j in range(len(dataset))]
    assert sorted(items) == sorted(stream_samples) and items != stream_samples
    assert dataset[-1]["tokens"].tolist() == items[-1]
    with pytest.raises(IndexError):
        dataset[30]


def test_long_documents_and_one_token_samples(tmp_path):
    indexed, documents = write_corpus(tmp_path / "long", [50, 3, 41])
    check_against_the_stream(PackedDataset(indexed, seq_len=16, num_samples=20, seed=0), documents)
    check_against_the_stream(PackedDataset(indexed, seq_len=1, num_samples=200, seed=0), documents)
    one_document, tokens = write_corpus(tmp_path / "one", [4])
    dataset = PackedDataset(one_document, seq_len=3, num_samples=10, seed=0)
    assert dataset.num_epochs == 8 and list(dataset.document_order) == [0] * 8
    check_against_the_stream(dataset, tokens)


def test_eos_id_ends_every_document(corpus):
    indexed, documents = corpus
    dataset = PackedDataset(indexed, seq_len=9, num_samples=25, seed=3, eos_id=9999)
    assert dataset.tokens_per_epoch == sum(LENGTHS) + 10
    check_against_the_stream(dataset, documents, eos_id=9999)


def test_a_document_subset(corpus):
    indexed, documents = corpus
    dataset = PackedDataset(indexed, seq_len=5, num_samples=12, seed=0, documents=[2, 6, 9, 10])
    assert set(dataset.document_order) == {2, 9, 10}  # 6 is empty
    check_against_the_stream(dataset, documents)


def test_deterministic_by_seed(corpus):
    indexed, _ = corpus
    first, again, other = (PackedDataset(indexed, seq_len=6, num_samples=20, seed=seed) for seed in (5, 5, 6))
    for dataset in (again, other):
        assert len(dataset) == len(first)
    assert all(torch.equal(first[i]["tokens"], again[i]["tokens"]) for i in range(20))
    assert [first[i]["tokens"].tolist() for i in range(20)] != [other[i]["tokens"].tolist() for i in range(20)]
    assert list(first.document_order) != list(other.document_order)


def count_builds(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return build_packing_index(*args, **kwargs)
    monkeypatch.setattr(packing, "build_packing_index", counting)
    return calls


def test_the_index_is_cached_reused_and_rebuilt_when_parameters_change(tmp_path, corpus, monkeypatch):
    indexed, documents = corpus
    cache = tmp_path / "cache"
    calls = count_builds(monkeypatch)
    built = PackedDataset(indexed, seq_len=7, num_samples=30, seed=1, cache_dir=str(cache))
    assert len(calls) == 1
    files = sorted(os.listdir(cache))
    assert len(files) == 3 and all(name.startswith("corpus_packed_") and name.endswith(".npy") for name in files)

    def fail(*args, **kwargs):
        raise AssertionError("the cached index should have been reused")
    uncached = PackedDataset(indexed, seq_len=7, num_samples=30, seed=1)  # no cache_dir: built, and equal
    monkeypatch.setattr(packing, "build_packing_index", fail)
    reused = PackedDataset(indexed, seq_len=7, num_samples=30, seed=1, cache_dir=str(cache))
    for i in range(30):
        assert torch.equal(reused[i]["tokens"], built[i]["tokens"])
        assert torch.equal(uncached[i]["tokens"], built[i]["tokens"])

    calls = count_builds(monkeypatch)
    for changed in (dict(seq_len=8), dict(num_samples=31), dict(seed=2), dict(documents=[0, 2, 3]),
                    dict(eos_id=0)):
        parameters = dict(seq_len=7, num_samples=30, seed=1, cache_dir=str(cache)) | changed
        check_against_the_stream(PackedDataset(indexed, **parameters), documents,
                                 eos_id=parameters.get("eos_id"))
    assert len(calls) == 5
    assert len(os.listdir(cache)) == 3 * 6  # and no temporary files left


def test_a_rewritten_corpus_or_a_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    indexed, _ = write_corpus(tmp_path / "corpus", [4, 8, 6])
    PackedDataset(indexed, seq_len=4, num_samples=10, seed=0, cache_dir=cache)
    calls = count_builds(monkeypatch)
    indexed, documents = write_corpus(tmp_path / "corpus", [4, 9, 6])  # same prefix, other lengths
    check_against_the_stream(PackedDataset(indexed, seq_len=4, num_samples=10, seed=0, cache_dir=cache), documents)
    assert len(calls) == 1
    damaged = PackedDataset(indexed, seq_len=4, num_samples=10, seed=0, cache_dir=cache).cache_files["sample_index"]
    with open(damaged, "r+b") as f:
        f.truncate(os.path.getsize(damaged) - 8)
    check_against_the_stream(PackedDataset(indexed, seq_len=4, num_samples=10, seed=0, cache_dir=cache), documents)
    assert len(calls) == 2
    with open(damaged, "wb") as f:
        f.write(b"not an array")
    check_against_the_stream(PackedDataset(indexed, seq_len=4, num_samples=10, seed=0, cache_dir=cache), documents)
    assert len(calls) == 3


def test_building_the_index_is_fast_for_millions_of_tokens():
    generator = np.random.default_rng(0)
    lengths = generator.integers(1, 400, 100_000)  # about 20M tokens
    start = time.perf_counter()
    index = build_packing_index(np.arange(len(lengths)), lengths, seq_len=2048, num_samples=15_000, seed=0)
    elapsed = time.perf_counter() - start
    assert index.sample_index.shape == (15_001, 2) and index.shuffle_index.shape == (15_000,)
    assert elapsed < 2.0, f"building the index took {elapsed:.2f} s"  # about 0.1 s alone; the CPUs are shared


def test_packing_errors(tmp_path, corpus):
    indexed, _ = corpus
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        PackedDataset(indexed, seq_len=0, num_samples=4, seed=0)
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        PackedDataset(indexed, seq_len=4, num_samples=0, seed=0)
    with pytest.raises(ValueError, match="documents: none of the 2 selected documents .* has any tokens"):
        PackedDataset(indexed, seq_len=4, num_samples=4, seed=0, documents=[1, 6])
    with pytest.raises(ValueError, match=r"documents must be ids in 0..11"):
        PackedDataset(indexed, seq_len=4, num_samples=4, seed=0, documents=[3, 12])
    empty, _ = write_corpus(tmp_path / "empty", [0, 0])
    with pytest.raises(ValueError, match="documents: none of the 2 selected documents"):
        PackedDataset(empty, seq_len=4, num_samples=4, seed=0)


# --- splitting -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_documents, fraction, expected_valid", [(100, 0.1, 10), (2, 0.01, 1), (5, 0.99, 4),
                                                                     (1, 0.5, 0), (10, 0.0, 0), (0, 0.2, 0)])
def test_split_documents(num_documents, fraction, expected_valid):
    train, valid = split_documents(num_documents, fraction, seed=3)
    assert len(valid) == expected_valid
    assert sorted(np.concatenate([train, valid]).tolist()) == list(range(num_documents))
    again = split_documents(num_documents, fraction, seed=3)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], valid)


def test_split_documents_depends_on_the_seed_and_rejects_bad_fractions():
    assert not np.array_equal(split_documents(100, 0.2, seed=0)[1], split_documents(100, 0.2, seed=1)[1])
    for fraction in (-0.1, 1.0):
        with pytest.raises(ValueError, match="valid_fraction"):
            split_documents(10, fraction, seed=0)
    with pytest.raises(ValueError, match="num_documents"):
        split_documents(-1, 0.1, seed=0)


# --- blending --------------------------------------------------------------------------------------------------------

def assert_proportions_within_one_sample(dataset_index, weights):
    shares = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    counts = np.cumsum(np.eye(len(shares))[dataset_index], axis=0)  # counts after each sample
    targets = np.arange(1, len(dataset_index) + 1)[:, None] * shares
    assert np.abs(counts - targets).max() < 1 + 1e-9


@pytest.mark.parametrize("weights", [[1, 1], [0.7, 0.2, 0.1], [3, 0, 1], [5, 1, 1, 1, 1, 1, 1], [1]])
def test_blending_proportions_are_exact_within_one_sample(weights):
    dataset_index, sample_in_dataset = blending_indices(weights, 2000)
    assert_proportions_within_one_sample(dataset_index, weights)
    for dataset in range(len(weights)):  # each dataset's samples are taken in order
        np.testing.assert_array_equal(sample_in_dataset[dataset_index == dataset],
                                      np.arange(np.count_nonzero(dataset_index == dataset)))


def test_blending_many_random_weights():
    generator = np.random.default_rng(0)
    for _ in range(30):
        weights = generator.random(generator.integers(2, 9)) ** 3
        assert_proportions_within_one_sample(blending_indices(weights, 500)[0], weights)


def test_blended_dataset(corpus):
    datasets = [[("a", i) for i in range(60)], [("b", i) for i in range(30)], [("c", i) for i in range(20)]]
    blended = BlendedDataset(datasets, [6, 3, 1], num_samples=100)
    samples = [blended[i] for i in range(len(blended))]
    names = [name for name, _ in samples]
    assert (names.count("a"), names.count("b"), names.count("c")) == (60, 30, 10)
    for name in "abc":  # each dataset's samples in its own order
        assert [i for n, i in samples if n == name] == list(range(names.count(name)))
    again = BlendedDataset(datasets, [0.6, 0.3, 0.1], num_samples=100)
    assert [again[i] for i in range(100)] == samples
    indexed, _ = corpus
    packed = [PackedDataset(indexed, seq_len=4, num_samples=n, seed=s) for n, s in ((7, 0), (4, 1))]
    mixed = BlendedDataset(packed, [2, 1], num_samples=9)
    assert torch.equal(mixed[0]["tokens"], packed[0][0]["tokens"])


def test_blending_errors():
    datasets = [list(range(10)), list(range(10))]
    for weights, message in (([1, -1], "non-negative"), ([0, 0], "not all zero"), ([1], "1 weights for 2 datasets"),
                             ([1, float("nan")], "finite")):
        with pytest.raises(ValueError, match=f"BlendedDataset: weights.*{message}"):
            BlendedDataset(datasets, weights, num_samples=4)
    with pytest.raises(ValueError, match=r"datasets\[1\] has 10 samples; .* needs 15"):
        BlendedDataset(datasets, [1, 3], num_samples=20)
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        BlendedDataset(datasets, [1, 1], num_samples=0)
    with pytest.raises(ValueError, match="datasets is empty"):
        BlendedDataset([], [], num_samples=1)


# --- collation and the model -----------------------------------------------------------------------------------------

def test_collate(corpus):
    indexed, _ = corpus
    dataset = PackedDataset(indexed, seq_len=10, num_samples=8, seed=0)
    samples = [dataset[i] for i in range(4)]
    batch = collate(samples)
    assert batch["tokens"].shape == batch["targets"].shape == batch["positions"].shape == (4, 10)
    assert batch["tokens"].dtype == batch["targets"].dtype == batch["positions"].dtype == torch.int64
    assert batch["cu_seqlens"].dtype == torch.int32
    for row, sample in enumerate(samples):
        assert torch.equal(batch["tokens"][row], sample["tokens"][:-1])
        assert torch.equal(batch["targets"][row], sample["tokens"][1:])
    # cu_seqlens starts a sequence exactly where the positions restart at 0, and they count up within it.
    flat_positions = batch["positions"].reshape(-1)
    starts = batch["cu_seqlens"][:-1].long()
    assert batch["cu_seqlens"][-1] == 40
    assert torch.equal(torch.nonzero(flat_positions == 0).reshape(-1), starts)
    lengths = batch["cu_seqlens"].diff().long()
    assert torch.equal(flat_positions, torch.arange(40) - torch.repeat_interleave(starts, lengths))
    assert len(starts) > 4  # some row holds more than one document
    with pytest.raises(ValueError, match="samples is empty"):
        collate([])
    other = PackedDataset(indexed, seq_len=5, num_samples=2, seed=0)
    with pytest.raises(ValueError, match="one length"):
        collate([samples[0], other[0]])


def test_packed_loss_is_the_loss_of_each_document_alone(tmp_path):
    """The model on a collated batch gives the token-weighted mean of the losses of its document pieces run one at a
    time, so no token attends across a document boundary."""
    config = AquilaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=300, multiple_of=16, max_seq_len=64)
    generator = np.random.default_rng(0)
    indexed, documents = write_corpus(tmp_path / "corpus", [5, 17, 3, 30, 9, 12, 1, 8],
                                      contents=lambda document, length: generator.integers(0, 300, length))
    dataset = PackedDataset(indexed, seq_len=24, num_samples=6, seed=0)
    stream, stream_document = stream_of(dataset, documents)
    samples = [3, 0, 4]  # stream samples
    batch = collate([dataset.stream_sample(sample) for sample in samples])
    torch.manual_seed(0)
    model = Aquila(config).eval()
    with torch.no_grad():
        packed_loss = model(batch["tokens"], batch["targets"], positions=batch["positions"],
                            cu_seqlens=batch["cu_seqlens"])
        total, pieces_seen = 0.0, 0
        for row, sample in enumerate(samples):
            _, pieces = expected_positions_and_pieces(stream_document, sample, dataset.seq_len)
            start = 0
            for length in pieces:
                tokens = batch["tokens"][row:row + 1, start:start + length]
                targets = batch["targets"][row:row + 1, start:start + length]
                total += model(tokens, targets).item() * length
                start += length
            pieces_seen += len(pieces)
        unmasked_loss = model(batch["tokens"], batch["targets"])
    assert pieces_seen > len(samples)
    expected = torch.tensor(total / batch["tokens"].numel())
    torch.testing.assert_close(packed_loss, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(unmasked_loss, expected, rtol=1e-4, atol=0)  # the check can tell
