import os

import numpy as np
import pytest
import torch

from aquila.data.tokenizer import SPECIAL_TOKENS, StreamDecoder, Tokenizer, byte_to_unicode

AWKWARD_TEXTS = [
    "", " ", "  leading and trailing  ", "\n\n\t\r\n", "a\x00b\x07c\x1b[0m",
    "床前明月光，疑是地上霜。", "混合 mixed 文本 with English, 数字 12345 and code: x = {'键': [1, 2]}",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇨🇳🇬🇧", "combining é́ and Hangul 한국어 and Arabic العربية",
    "literal specials </s> [CLS] <|endoftext|> [gMASK] are text", "\ufeffBOM and \u200b zero width",
    "𠀀𪚥 supplementary-plane CJK", "tab\tseparated\tvalues\n" * 3,
]


def test_layout_puts_the_specials_after_the_learned_tokens(small_tokenizer):
    vocab = small_tokenizer.vocabulary()
    assert small_tokenizer.vocab_size == 520 == len(vocab)
    assert vocab["<|endoftext|>"] == 0 == small_tokenizer.pad_id
    learned = 520 - len(SPECIAL_TOKENS)
    assert [vocab[t] for t in SPECIAL_TOKENS] == list(range(learned, 520))
    assert (small_tokenizer.bos_id, small_tokenizer.eos_id) == (518, 519)  # 100006 / 100007 at full size


@pytest.mark.parametrize("text", AWKWARD_TEXTS)
def test_round_trip_is_exact(small_tokenizer, text):
    ids = small_tokenizer.encode(text)
    assert not set(ids) & small_tokenizer.special_ids  # text is literal: no control token from user text
    assert small_tokenizer.decode(ids) == text
    assert small_tokenizer.encode_batch([text, text]) == [ids, ids]


def test_bos_and_eos_only_on_request(small_tokenizer):
    ids = small_tokenizer.encode("hello")
    assert small_tokenizer.encode("hello", bos=True, eos=True) == [518, *ids, 519]
    assert small_tokenizer.decode([518, *ids, 519]) == "hello"
    assert small_tokenizer.decode([518, *ids, 519], skip_special=False) == "[CLS]hello</s>"


def test_lone_surrogates_are_an_error_or_replaced(small_tokenizer):
    with pytest.raises(ValueError, match="lone surrogate .* position 1"):
        small_tokenizer.encode("a\ud800b")
    ids = small_tokenizer.encode("a\ud800b\udfff", errors="replace")
    assert small_tokenizer.decode(ids) == "a\ufffdb\ufffd"
    with pytest.raises(ValueError, match="errors"):
        small_tokenizer.encode("a\ud800", errors="ignore")
    with pytest.raises(TypeError, match="str"):
        small_tokenizer.encode(b"bytes")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        small_tokenizer.decode([520])


def test_byte_alphabet_is_a_bijection():
    mapping = byte_to_unicode()
    assert sorted(mapping) == list(range(256)) and len(set(mapping.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in mapping.values())


@pytest.mark.parametrize("text", AWKWARD_TEXTS[5:9])
def test_stream_decoder_yields_whole_characters(small_tokenizer, text):
    decoder = StreamDecoder(small_tokenizer)
    pieces = [decoder.push(i) for i in small_tokenizer.encode(text)]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + decoder.flush() == text
    # Byte-level tokens split CJK characters: somewhere a token alone is not a whole character and is held back.
    if "床" in text:
        assert any(piece == "" for piece in pieces)


def test_stream_decoder_flush_marks_a_cut_character(small_tokenizer):
    ids = small_tokenizer.encode("月")
    partial = [i for i in ids for b in [small_tokenizer.token_bytes(i)] if len(b) < 3][:1]
    if not partial:
        pytest.skip("月 is one token in this vocabulary")
    decoder = StreamDecoder(small_tokenizer)
    assert decoder.push(partial[0]) == "" and decoder.flush() == "\ufffd"


def test_save_and_load_both_formats(small_tokenizer, tmp_path):
    directory = tmp_path / "tok"
    small_tokenizer.save(str(directory))
    assert sorted(os.listdir(directory)) == ["merges.txt", "special_tokens_map.json", "tokenizer.json",
                                             "tokenizer_config.json", "vocab.json"]
    text = "\n".join(AWKWARD_TEXTS)
    expected = small_tokenizer.encode(text)
    assert Tokenizer.load(str(directory)).encode(text) == expected
    assert Tokenizer.load(str(directory / "tokenizer.json")).encode(text) == expected
    (directory / "tokenizer.json").unlink()  # only FlagAI's vocab.json + merges.txt left
    flagai = Tokenizer.load(str(directory))
    assert flagai.encode(text) == expected
    assert (flagai.bos_id, flagai.eos_id, flagai.vocab_size) == (518, 519, 520)
    assert flagai.decode(expected) == text


def test_saving_writes_each_file_atomically_beside_other_files(small_tokenizer, tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"weights")  # a checkpoint directory keeps its other files
    small_tokenizer.save(str(tmp_path))
    before = (tmp_path / "merges.txt").read_bytes()
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: real_replace(src, dst) if dst.endswith(".json")
                        else (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        small_tokenizer.save(str(tmp_path))
    assert (tmp_path / "merges.txt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "model.safetensors", "special_tokens_map.json",
                                                          "tokenizer.json", "tokenizer_config.json", "vocab.json"]


def test_transformers_loads_it_with_the_right_specials(small_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    small_tokenizer.save(str(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert isinstance(hf, transformers.PreTrainedTokenizerFast)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (518, 519, 0, 0)
    assert hf.convert_tokens_to_ids("[gMASK]") == 516
    text = "床前明月光 and some English, def f(): return 1"
    assert hf(text)["input_ids"] == small_tokenizer.encode(text)  # no BOS added behind the user's back
    assert hf.decode(small_tokenizer.encode(text)) == text


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json"):
        Tokenizer.load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such file"):
        Tokenizer.load(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="vocab_size must be at least"):
        Tokenizer.train(["abc"], vocab_size=100)


def test_decode_refuses_ids_that_are_not_integers(small_tokenizer):
    with pytest.raises(TypeError, match=r"Tokenizer.decode: ids\[1\] is 100.9, not an integer token id"):
        small_tokenizer.decode([5, 100.9])
    ids = small_tokenizer.encode("床前明月光")  # integer ids of any kind still decode
    assert small_tokenizer.decode(np.array(ids, dtype=np.uint16)) == small_tokenizer.decode(torch.tensor(ids)) == \
        "床前明月光"


def test_decode_refuses_ids_outside_the_vocabulary(small_tokenizer):
    size = small_tokenizer.vocab_size
    with pytest.raises(ValueError, match=rf"decode: ids\[0\] = {size} is outside the vocabulary \[0, {size}\)"):
        small_tokenizer.decode([size])
    with pytest.raises(ValueError, match=r"ids\[2\] = -1 is outside the vocabulary"):
        small_tokenizer.decode([1, 2, -1])


def test_encode_refuses_an_unknown_errors_value(small_tokenizer):
    for encode in (small_tokenizer.encode, small_tokenizer.encode_batch):
        with pytest.raises(ValueError, match="errors must be one of 'strict', 'replace', got 'bogus'"):
            encode("plain text" if encode == small_tokenizer.encode else [], errors="bogus")


def test_training_on_no_text_is_refused():
    with pytest.raises(ValueError, match="Tokenizer.train: no text to learn from"):
        Tokenizer.train(["", ""], vocab_size=300, show_progress=False)


@pytest.mark.parametrize("content", [b"", b"{not json", b"\xff\xfe garbage", b'{"model": {"type": "BPE"}}'])
def test_a_corrupt_tokenizer_json_is_a_value_error_naming_it(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"Tokenizer.load: {path}"):
        Tokenizer.load(str(tmp_path))
