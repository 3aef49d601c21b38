"""tokenize: a byte-level BPE that round-trips any text, loads in transformers, and writes memmap shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, normalizers

from pipelines.common.clean_split import CleanSplitError
from pipelines.common.params import DataParams, LocalSource, TokenizerParams
from pipelines.tokenize import stage as tokenize_stage
from pipelines.tokenize.sample import drawn
from pipelines.tokenize.stage import (
    EOT,
    SPECIAL_TOKENS,
    TokenizeError,
    token_dtype,
    tokenize_corpus,
    train_tokenizer,
)
from tests.helpers.corpus import write_clean

TRICKY = [
    "",
    " ",
    "hello world",
    "  leading and trailing  \n\n\t",
    "Ünïcödé café — naïve",
    "日本語のテキストと中文",
    "한국어 텍스트",
    "Привет, мир",
    "مرحبا بالعالم",
    "emoji 🎉👩‍👩‍👧‍👦🇫🇷 mixed",
    "\u200b zero width \ufeff bom inside",
    "invalid-looking \\xff\\xfe escapes",
    "<|endoftext|> typed in a document stays text",
    "<|im_start|>user\nhi<|im_end|>",
    "x" * 5000,
]
PLAIN = [t for t in TRICKY if "<|" not in t]


TIMINGS = ("encode_mb_per_s", "train_tokenizer_seconds")


def local(workers: int) -> DataParams:
    return DataParams(sources=[LocalSource(type="local", path="corpus")], workers=workers)


def outputs(root: Path) -> dict[str, bytes]:
    """Every output file under root by relative path; the metrics without their timings."""
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "tokenizer").iterdir())}
    files |= {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "tokens").iterdir())}
    metrics = json.loads((root / "metrics.json").read_text())
    files["metrics.json"] = json.dumps({k: v for k, v in metrics.items() if k not in TIMINGS}).encode()
    return files


def build(root: Path) -> tuple[dict, dict]:
    """The clean splits with TRICKY, tokenized under root: (texts by split, the stage's metrics)."""
    texts = write_clean(root / "clean", extra=TRICKY)
    params = TokenizerParams(vocab_size=512, min_frequency=2)
    metrics = tokenize_corpus(params, root / "clean", root / "tokenizer", root / "tokens", root / "metrics.json")
    return texts, metrics


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict, dict]:
    root = tmp_path_factory.mktemp("tok")
    return root, *build(root)


@pytest.fixture(scope="module")
def tokenizer(built) -> Tokenizer:
    return Tokenizer.from_file(str(built[0] / "tokenizer" / "tokenizer.json"))


def test_shards_hold_every_document_followed_by_eot(built, tokenizer):
    root, texts, metrics = built
    meta = json.loads((root / "tokens" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["eot_id"] == tokenizer.token_to_id(EOT) == 0
    assert meta["special_tokens"] == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    stage_view = Tokenizer.from_file(str(root / "tokenizer" / "tokenizer.json"))
    stage_view.encode_special_tokens = True  # as the stage encodes: typed special strings are text
    for split, docs in texts.items():
        ids = np.memmap(root / "tokens" / f"{split}.bin", dtype=np.uint16, mode="r")
        expected = [t for d in docs for t in (*stage_view.encode(d, add_special_tokens=False).ids, 0)]
        assert ids.tolist() == expected
        assert meta["splits"][split] == {
            "docs": len(docs),
            "tokens": len(expected),
            "bytes": sum(len(d.encode()) for d in docs),
        }
        assert metrics["tokens"][split] == len(expected)
    assert metrics["vocab_size"] == meta["vocab_size"] == tokenizer.get_vocab_size() <= 512
    assert metrics["tokenizer_sha256"] == meta["tokenizer_sha256"]
    assert 1.0 < metrics["bytes_per_token"] < 8.0 and metrics["encode_mb_per_s"] > 0
    assert json.loads((root / "metrics.json").read_text()) == metrics


def test_special_token_text_in_a_document_is_not_a_separator(built, tokenizer):
    ids = np.memmap(built[0] / "tokens" / "train.bin", dtype=np.uint16, mode="r")
    docs = built[1]["train"]
    assert int((ids == 0).sum()) == len(docs)  # exactly one EOT per document, none from the typed "<|endoftext|>"


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky_strings(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_round_trip_arbitrary_unicode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_transformers_autotokenizer_gives_the_same_ids(built, tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(built[0] / "tokenizer"))
    for text in PLAIN + built[1]["val"]:
        assert hf(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text, add_special_tokens=False).ids
    assert hf.eos_token == EOT and hf.eos_token_id == 0
    chat = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_training_is_deterministic(built, tmp_path):
    _, again = build(tmp_path)
    assert again["tokenizer_sha256"] == built[2]["tokenizer_sha256"]
    assert (tmp_path / "tokens" / "train.bin").read_bytes() == (built[0] / "tokens" / "train.bin").read_bytes()


def test_outputs_are_the_same_bytes_whatever_the_workers_and_chunks(tmp_path, pool_for_tiny_steps):
    """Two processes over ranges of 2 kB (many per split, the tokenizer trained on a sample drawn by them too)
    write what one process writes over whole splits."""
    write_clean(tmp_path / "clean", n_train=200, n_val=12, n_test=12, extra=TRICKY)
    params = TokenizerParams(vocab_size=400, train_sample_bytes=2**16)  # train.jsonl is about 3 times as large
    runs = {}
    for workers, chunk_bytes in [(1, 16 * 2**20), (2, 2000)]:
        root = tmp_path / f"w{workers}"
        paths = (root / "tokenizer", root / "tokens", root / "metrics.json")
        tokenize_corpus(params, tmp_path / "clean", *paths, data=local(workers), chunk_bytes=chunk_bytes)
        runs[workers] = outputs(root)
    assert sorted(runs[1]) == [
        "metrics.json",
        *(f"tokenizer/{n}" for n in ("chat_template.jinja", "tokenizer.json", "tokenizer_config.json")),
        *(f"tokens/{n}" for n in ("meta.json", "test.bin", "train.bin", "val.bin")),
    ]
    assert runs[2] == runs[1]


def test_the_tokenizer_trains_on_a_deterministic_sample_or_the_whole_smaller_split(tmp_path):
    texts = write_clean(tmp_path / "clean", n_train=200)["train"]
    size = (tmp_path / "clean" / "train.jsonl").stat().st_size
    vocab = {}
    for sample_bytes in (2**16, size, 2**30):
        params = TokenizerParams(vocab_size=400, train_sample_bytes=sample_bytes)
        root = tmp_path / str(sample_bytes)
        tokenize_corpus(params, tmp_path / "clean", root / "tok", root / "tokens", root / "m.json")
        vocab[sample_bytes] = Tokenizer.from_file(str(root / "tok" / "tokenizer.json")).get_vocab()
    assert vocab[size] == vocab[2**30] == train_tokenizer(iter(texts), params).get_vocab()
    sample = [t for t in texts if drawn(t, 2**16 / size)]
    assert 0.2 < len(sample) / len(texts) < 0.5
    assert vocab[2**16] == train_tokenizer(iter(sample), params).get_vocab() != vocab[size]


def test_uint32_when_the_vocabulary_needs_it():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_missing_inputs_and_bad_records_fail_clearly_and_keep_old_outputs(built, tmp_path):
    params = TokenizerParams(vocab_size=512)
    with pytest.raises(TokenizeError, match=r"run the clean stage first \(dvc repro clean\)"):
        tokenize_corpus(params, tmp_path / "clean", tmp_path / "tok", tmp_path / "tokens", tmp_path / "m.json")

    write_clean(tmp_path / "clean")
    tokenize_corpus(params, tmp_path / "clean", tmp_path / "tok", tmp_path / "tokens", tmp_path / "m.json")
    before = (tmp_path / "tokens" / "train.bin").read_bytes()
    with open(tmp_path / "clean" / "test.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(CleanSplitError, match=r"test.jsonl:5 is not a clean record"):
        tokenize_corpus(params, tmp_path / "clean", tmp_path / "tok", tmp_path / "tokens", tmp_path / "m.json")
    assert (tmp_path / "tokens" / "train.bin").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "m.json", "tok", "tokens"]


def test_a_document_that_does_not_decode_back_to_its_text_is_refused(tmp_path, monkeypatch):
    """A tokenizer that alters text on the way in (here an NFKC normalizer: the ligature "ﬁ" becomes "fi") would
    write altered text to the shards: the stage refuses, naming the split and the document, and keeps the old
    outputs."""
    params = TokenizerParams(vocab_size=512)
    paths = (tmp_path / "clean", tmp_path / "tok", tmp_path / "tokens", tmp_path / "m.json")
    write_clean(tmp_path / "clean", n_train=60, extra=["The ﬁrst ligature."])  # train document 61
    tokenize_corpus(params, *paths)  # the stage's own byte-level tokenizer gives it back exactly
    before = {p.name: p.read_bytes() for p in sorted((tmp_path / "tokens").iterdir())}

    train_tokenizer = tokenize_stage.train_tokenizer

    def with_nfkc(texts, params):
        tokenizer = train_tokenizer(texts, params)
        tokenizer.normalizer = normalizers.NFKC()
        return tokenizer

    monkeypatch.setattr(tokenize_stage, "train_tokenizer", with_nfkc)
    with pytest.raises(TokenizeError, match=r"train\.jsonl batch at document 1: document 61 does not survive encode"):
        tokenize_corpus(params, *paths)
    assert {p.name: p.read_bytes() for p in sorted((tmp_path / "tokens").iterdir())} == before


def test_errors_in_a_later_range_name_the_line_and_document_of_the_whole_split(
    tmp_path, monkeypatch, pool_for_tiny_steps
):
    """One task per line, on two processes: the errors still count lines and documents from the split's start."""
    paths = (tmp_path / "clean", tmp_path / "tok", tmp_path / "tokens", tmp_path / "m.json")
    params, engine = TokenizerParams(vocab_size=512), {"data": local(2), "chunk_bytes": 1}
    write_clean(tmp_path / "clean", n_train=60, extra=["The ﬁrst ligature."])  # train document 61
    with open(tmp_path / "clean" / "test.jsonl", "a") as f:
        f.write('\n{"text": "fine"}\n{"text": 7}\n')  # a blank line 5, a good line 6, a bad line 7
    with pytest.raises(CleanSplitError, match=r"test\.jsonl:7 is not a clean record"):
        tokenize_corpus(params, *paths, **engine)

    (tmp_path / "clean" / "test.jsonl").write_text("".join(open(tmp_path / "clean" / "test.jsonl").readlines()[:6]))
    train_tokenizer = tokenize_stage.train_tokenizer

    def with_nfkc(texts, params):
        tokenizer = train_tokenizer(texts, params)
        tokenizer.normalizer = normalizers.NFKC()  # reaches the workers through tokenizer.json
        return tokenizer

    monkeypatch.setattr(tokenize_stage, "train_tokenizer", with_nfkc)
    with pytest.raises(TokenizeError, match=r"train\.jsonl batch at document 61: document 1 does not survive encode"):
        tokenize_corpus(params, *paths, **engine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean"]
