import pytest
import torch

from modalforge.data.errors import DecodeError
from modalforge.data.text import TextConfig, WordVocab, load_tokenizer, normalize_text, tokenize


def test_normalize_text():
    assert normalize_text("  cafe\u0301 ") == "caf\u00e9"  # NFC
    assert normalize_text(b"hi") == "hi"
    for bad, msg in [("   ", "empty"), (b"\xff\xfe", "UTF-8"), (3, "expected text")]:
        with pytest.raises(DecodeError, match=msg):
            normalize_text(bad)


def test_word_vocab_build_is_deterministic_and_frequency_ordered():
    texts = ["the cat sat", "the dog", "a cat!"]
    vocab = WordVocab.build(texts)
    assert vocab.itos[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert vocab.itos[4:6] == ["cat", "the"]  # freq 2, alphabetical tie-break
    assert WordVocab.build(list(reversed(texts))).itos == vocab.itos
    assert len(WordVocab.build(texts, max_size=6)) == 6
    assert "!" in WordVocab.build(texts, min_freq=1).stoi
    assert "dog" not in WordVocab.build(texts, min_freq=2).stoi


def test_word_vocab_encode_pad_truncate(tmp_path):
    vocab = WordVocab.build(["red apple", "green apple"])
    out = tokenize(["Red apple", "green pear apple red apple"], vocab, TextConfig(max_length=5))
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == (2, 5) and mask.shape == (2, 5)
    apple, red = vocab.stoi["apple"], vocab.stoi["red"]
    assert ids[0].tolist() == [vocab.bos_id, red, apple, vocab.eos_id, vocab.pad_id]
    assert mask[0].tolist() == [1, 1, 1, 1, 0]
    assert ids[1, -1] == vocab.eos_id and ids[1, 2] == vocab.unk_id  # truncated, "pear" unknown
    longest = tokenize(["red"], vocab, TextConfig(max_length=10, padding="longest"))
    assert longest["input_ids"].shape == (1, 3)
    vocab.save(tmp_path / "v.json")
    assert WordVocab.load(tmp_path / "v.json").itos == vocab.itos
    assert vocab.decode(ids[0].tolist()) == "red apple"


@pytest.mark.weights
def test_packaged_minilm_tokenizer_golden_ids():
    tok = load_tokenizer("minilm")
    out = tokenize(["hello world"], tok, TextConfig(max_length=8))
    # BERT uncased vocabulary: [CLS] hello world [SEP] then padding
    assert out["input_ids"][0].tolist() == [101, 7592, 2088, 102, 0, 0, 0, 0]
    assert out["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert out["input_ids"].dtype == torch.long


def test_local_folder_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_tokenizer(str(tmp_path / "nope"))
