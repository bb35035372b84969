"""Tokenizer loading from the published Phi-2 folder formats, checked against transformers' tokenizer."""

import json

import pytest
from tokenizers import ByteLevelBPETokenizer

from tinygptv.tokenizer import EOS_TOKEN, Tokenizer

TEXT = ["###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: a red ball.",
        "[INST] <Img><ImageHere></Img> [refer] where is the cat?  [/INST]{<12><30><55><98>}###",
        "Hello    world!  Ünïcödé and  code:\n\tdef f(x):\n        return x"] * 20


@pytest.fixture(scope="module")
def phi_like_folder(tmp_path_factory):
    """A tiny GPT-2-style BPE saved as vocab.json + merges.txt + added_tokens.json (the Phi-2 file set)."""
    folder = tmp_path_factory.mktemp("tok")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXT, vocab_size=400, min_frequency=1, special_tokens=[])
    bpe.save_model(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text())
    added = {EOS_TOKEN: len(vocab), "  ": len(vocab) + 1}  # Phi-2 adds whitespace-run tokens after the vocab
    (folder / "added_tokens.json").write_text(json.dumps(added))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CodeGenTokenizer", "bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN,
         "unk_token": EOS_TOKEN, "add_prefix_space": False}))
    return folder


def test_vocab_merges_folder_matches_transformers(phi_like_folder):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_folder(phi_like_folder)
    ref = transformers.AutoTokenizer.from_pretrained(str(phi_like_folder))
    assert ours.eos_id == ref.convert_tokens_to_ids(EOS_TOKEN)
    for text in TEXT[:3] + ["", "x<|endoftext|>y", "  leading spaces"]:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
        ids = ours.encode(text)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


def test_tokenizer_json_round_trip(phi_like_folder, tmp_path):
    ours = Tokenizer.from_folder(phi_like_folder)
    ours.save(tmp_path)
    again = Tokenizer.from_folder(tmp_path)
    for text in TEXT[:3]:
        assert again.encode(text) == ours.encode(text)
    assert again.eos_id == ours.eos_id


def test_no_special_tokens_added(phi_like_folder):
    tok = Tokenizer.from_folder(phi_like_folder)
    assert tok.eos_id not in tok.encode("plain text")
    assert tok.encode("a<|endoftext|>b").count(tok.eos_id) == 1


def test_byte_level_fallback():
    tok = Tokenizer.byte_level(eos_id=0)
    assert tok.encode("Ab") == [ord("A") + 1, ord("b") + 1]
    assert tok.decode(tok.encode("héllo ✓")) == "héllo ✓"
    assert Tokenizer.byte_level(eos_id=256).encode("\xff") == [0xC3, 0xBF]  # UTF-8 bytes of ÿ, ids = bytes


def test_byte_bpe_in_memory():
    from tinygptv.tokenizer import bytes_to_unicode

    byte = bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(byte.values())}
    space = byte[ord(" ")]
    vocab.update({space + "c": 256, space + "ca": 257, space + "cat": 258})
    tok = Tokenizer.byte_bpe(vocab, [(space, "c"), (space + "c", "a"), (space + "ca", "t")])
    ids = tok.encode("a cat cab")
    assert [tok.decode([i]) for i in ids] == ["a", " cat", " ca", "b"]
    assert tok.decode(ids) == "a cat cab"
    assert tok.eos_id == 259


def test_inference_benchmark_splits_prompts_as_phi2():
    """The full-size inference benchmark prefills the TTFT prompt at its real length under Phi-2's tokenizer."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "inference.py"
    spec = importlib.util.spec_from_file_location("inference_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tok = bench.phi2_split_tokenizer()  # raises if a template piece splits otherwise
    assert bench.ttft_layout() == (1 + 7, 16)
    assert tok.decode(tok.encode(bench.QUESTIONS[1])) == bench.QUESTIONS[1]


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        Tokenizer.from_folder(tmp_path)
