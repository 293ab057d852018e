"""The Megatron mmap indexed format: files written by hand from the published layout read back, our writer writes
the same bytes, and every kind of damage is reported with the file named."""

import os
import pickle
import struct

import numpy as np
import pytest

from aquila.data.indexed import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter, best_dtype

DOCUMENTS = [[5, 6, 7], [1], [], [65535, 0, 42, 9, 9], list(range(100, 140))]
CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7,
         np.uint16: 8}


def write_like_megatron(prefix, documents, dtype):
    """An independent writer following the published layout, one document per sequence."""
    dtype = np.dtype(dtype)
    sizes = [len(document) for document in documents]
    pointers, offset = [], 0
    for size in sizes:
        pointers.append(offset)
        offset += size * dtype.itemsize
    with open(f"{prefix}.bin", "wb") as f:
        for document in documents:
            f.write(np.asarray(document, dtype=dtype.newbyteorder("<")).tobytes())
    n = len(sizes)
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", CODES[dtype.type]))
        f.write(struct.pack("<Q", n))
        f.write(struct.pack("<Q", n + 1))
        f.write(struct.pack(f"<{n}i", *sizes))
        f.write(struct.pack(f"<{n}q", *pointers))
        f.write(struct.pack(f"<{n + 1}q", *range(n + 1)))


def write_ours(prefix, documents, dtype):
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for document in documents:
            writer.add_document(document)


def assert_reads_back(dataset, documents, dtype):
    assert len(dataset) == len(documents)
    assert dataset.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(dataset.sizes, [len(d) for d in documents])
    np.testing.assert_array_equal(dataset.document_indices, np.arange(len(documents) + 1))
    for index, document in enumerate(documents):
        np.testing.assert_array_equal(dataset[index], np.asarray(document, dtype=dtype))


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32])
def test_reads_a_file_written_from_the_published_layout(tmp_path, dtype):
    documents = [[1, 2, 3], [], [4, 5, 6, 7]]
    write_like_megatron(tmp_path / "corpus", documents, dtype)
    dataset = IndexedDataset(str(tmp_path / "corpus"))
    assert_reads_back(dataset, documents, dtype)
    assert dataset.empty_documents == 1
    assert dataset.num_tokens == 7


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_writer_round_trips_and_writes_the_same_bytes_as_the_layout(tmp_path, dtype):
    write_ours(str(tmp_path / "ours"), DOCUMENTS, dtype)
    write_like_megatron(tmp_path / "reference", DOCUMENTS, dtype)
    for extension in ("bin", "idx"):
        assert (tmp_path / f"ours.{extension}").read_bytes() == (tmp_path / f"reference.{extension}").read_bytes()
    assert_reads_back(IndexedDataset(str(tmp_path / "ours")), DOCUMENTS, dtype)
    assert sorted(os.listdir(tmp_path)) == ["ours.bin", "ours.idx", "reference.bin", "reference.idx"]


def test_items_are_read_only_views_of_the_mapped_file(tmp_path):
    write_ours(str(tmp_path / "corpus"), DOCUMENTS, np.int32)
    dataset = IndexedDataset(str(tmp_path / "corpus"))
    item = dataset[4]
    assert not item.flags.writeable and not item.flags.owndata
    np.testing.assert_array_equal(dataset.get(4, offset=3, length=5), np.arange(103, 108))
    np.testing.assert_array_equal(dataset.get(4, offset=38), [138, 139])
    np.testing.assert_array_equal(dataset[-1], np.arange(100, 140))
    with pytest.raises(IndexError, match="out of range"):
        dataset[5]
    with pytest.raises(IndexError, match="out of range"):
        dataset.get(0, offset=2, length=2)
    assert_reads_back(pickle.loads(pickle.dumps(dataset)), DOCUMENTS, np.int32)


def test_zero_documents(tmp_path):
    write_ours(str(tmp_path / "empty"), [], np.uint16)
    write_like_megatron(tmp_path / "reference", [], np.uint16)
    assert (tmp_path / "empty.idx").read_bytes() == (tmp_path / "reference.idx").read_bytes()
    assert (tmp_path / "empty.bin").stat().st_size == 0
    dataset = IndexedDataset(str(tmp_path / "empty"))
    assert len(dataset) == 0 and dataset.num_tokens == 0
    np.testing.assert_array_equal(dataset.document_indices, [0])


def test_documents_of_length_zero(tmp_path):
    write_ours(str(tmp_path / "corpus"), [[], [3, 4], []], np.uint16)
    dataset = IndexedDataset(str(tmp_path / "corpus"))
    assert dataset.empty_documents == 2
    assert dataset[0].shape == (0,) and dataset[2].shape == (0,)
    np.testing.assert_array_equal(dataset[1], [3, 4])


def test_only_empty_documents(tmp_path):
    write_ours(str(tmp_path / "corpus"), [[], []], np.int32)
    dataset = IndexedDataset(str(tmp_path / "corpus"))
    assert len(dataset) == 2 and dataset.empty_documents == 2 and dataset[1].shape == (0,)


def test_best_dtype_follows_megatron():
    assert best_dtype(100008) == np.int32
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32
    assert best_dtype(8008) == np.uint16


@pytest.mark.parametrize("dtype, bad_value, limits", [(np.uint16, 65536, "0..65535"), (np.uint16, -1, "0..65535"),
                                                      (np.int32, 2 ** 31, "-2147483648..2147483647"),
                                                      (np.uint8, 2 ** 70, "0..255")])
def test_values_that_do_not_fit_the_dtype_are_rejected(tmp_path, dtype, bad_value, limits):
    with (pytest.raises(ValueError, match=rf"token id {bad_value} at position 2 of document 1 .*\(range {limits}\)"),
          IndexedDatasetWriter(str(tmp_path / "corpus"), dtype) as writer):
            writer.add_document([1, 2])
            writer.add_document([3, 4, bad_value, 5])
    assert os.listdir(tmp_path) == []


def test_non_integer_documents_are_rejected(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "corpus"), np.int32) as writer:
        with pytest.raises(ValueError, match="integer token ids"):
            writer.add_document([1.5, 2.0])
        with pytest.raises(ValueError, match="1-D"):
            writer.add_document([[1, 2]])
        writer.add_document([1, 2])
    assert_reads_back(IndexedDataset(str(tmp_path / "corpus")), [[1, 2]], np.int32)
    with pytest.raises(ValueError, match="dtype must be one of"):
        IndexedDatasetWriter(str(tmp_path / "floats"), np.float32)


def test_an_exception_inside_the_writer_leaves_nothing_behind(tmp_path):
    with (pytest.raises(RuntimeError, match="tokenizer crashed"),
          IndexedDatasetWriter(str(tmp_path / "corpus"), np.uint16) as writer):
            writer.add_document([1, 2, 3])
            raise RuntimeError("tokenizer crashed")
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="aborted"):
        writer.add_document([4])


def test_a_failed_rewrite_keeps_the_previous_dataset(tmp_path):
    prefix = str(tmp_path / "corpus")
    write_ours(prefix, [[1, 2]], np.uint16)
    with pytest.raises(KeyboardInterrupt), IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document([7, 8, 9])
        raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["corpus.bin", "corpus.idx"]
    assert_reads_back(IndexedDataset(prefix), [[1, 2]], np.uint16)


def test_finalize_without_a_context_manager(tmp_path):
    writer = IndexedDatasetWriter(str(tmp_path / "corpus"), np.int32)
    writer.add_document([1])
    assert not (tmp_path / "corpus.idx").exists()
    writer.finalize()
    assert_reads_back(IndexedDataset(str(tmp_path / "corpus")), [[1]], np.int32)
    with pytest.raises(RuntimeError, match="finalized"):
        writer.finalize()


# --- damaged files ---------------------------------------------------------------------------------------------------

@pytest.fixture
def corpus(tmp_path):
    prefix = str(tmp_path / "corpus")
    write_like_megatron(prefix, DOCUMENTS, np.int32)
    return prefix


def rewrite(path, transform):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(transform(data))


def test_missing_files(corpus):
    os.remove(f"{corpus}.bin")
    with pytest.raises(IndexedDatasetError, match=r"corpus\.bin does not exist"):
        IndexedDataset(corpus)
    os.remove(f"{corpus}.idx")
    with pytest.raises(IndexedDatasetError, match=r"corpus\.idx does not exist"):
        IndexedDataset(corpus)


def test_truncated_bin(corpus):
    rewrite(f"{corpus}.bin", lambda data: data[:-4])
    with pytest.raises(IndexedDatasetError, match=r"corpus\.bin has 192 bytes, but .*corpus\.idx describes 196"):
        IndexedDataset(corpus)


@pytest.mark.parametrize("keep", [20, 60, -1])
def test_truncated_idx(corpus, keep):
    rewrite(f"{corpus}.idx", lambda data: data[:keep])
    with pytest.raises(IndexedDatasetError, match=r"corpus\.idx is truncated"):
        IndexedDataset(corpus)


def test_trailing_bytes_in_the_idx(corpus):
    rewrite(f"{corpus}.idx", lambda data: data + b"\x00" * 5)
    with pytest.raises(IndexedDatasetError, match=r"corpus\.idx has 5 bytes after its document index"):
        IndexedDataset(corpus)


def test_wrong_magic(corpus):
    rewrite(f"{corpus}.idx", lambda data: b"TNTIDX\x00\x00\x00" + data[9:])
    with pytest.raises(IndexedDatasetError, match=r"corpus\.idx is not a Megatron mmap index"):
        IndexedDataset(corpus)


def test_unsupported_version(corpus):
    rewrite(f"{corpus}.idx", lambda data: data[:9] + struct.pack("<Q", 2) + data[17:])
    with pytest.raises(IndexedDatasetError, match=r"corpus\.idx has index version 2"):
        IndexedDataset(corpus)


def test_unknown_dtype_code(corpus):
    rewrite(f"{corpus}.idx", lambda data: data[:17] + bytes([9]) + data[18:])
    with pytest.raises(IndexedDatasetError, match=r"corpus\.idx has dtype code 9"):
        IndexedDataset(corpus)


def test_a_bin_from_another_dataset(tmp_path, corpus):
    write_like_megatron(tmp_path / "other", [[1, 2, 3, 4]], np.int32)
    os.replace(tmp_path / "other.bin", f"{corpus}.bin")
    with pytest.raises(IndexedDatasetError, match=r"corpus\.bin has 16 bytes, .* not the one this index was written"):
        IndexedDataset(corpus)


def test_pointers_inconsistent_with_sizes(corpus):
    pointers_offset = 34 + 4 * len(DOCUMENTS)
    bad_pointer = struct.pack("<q", 8)  # sequence 1 really starts at byte 12
    rewrite(f"{corpus}.idx", lambda data: data[:pointers_offset + 8] + bad_pointer + data[pointers_offset + 16:])
    with pytest.raises(IndexedDatasetError, match=r"corpus\.idx: sequence 1 starts at byte 8 .* at byte 12"):
        IndexedDataset(corpus)


@pytest.mark.parametrize("entries", [[0, 2, 1, 3, 4, 5], [0, 1, 2, 3, 4, 6], [1, 1, 2, 3, 4, 5]])
def test_bad_document_index(corpus, entries):
    documents_offset = 34 + 12 * len(DOCUMENTS)
    rewrite(f"{corpus}.idx", lambda data: data[:documents_offset] + struct.pack("<6q", *entries))
    with pytest.raises(IndexedDatasetError, match=r"corpus\.idx: the document index must"):
        IndexedDataset(corpus)
