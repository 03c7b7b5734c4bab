"""Parallel text for the Transformer task (Vaswani et al., "Attention Is All You Need", NeurIPS
2017): WMT14 English–German raw text from a path, a joined sentencepiece vocabulary (Kudo &
Richardson, EMNLP 2018 demo), length-bucketed batches, and the tiny number-words corpus.

Layout under the data directory (``<data_root>/<dataset>/``): ``train.en``, ``train.de``,
``valid.en``, ``valid.de``, ``test.en``, ``test.de`` (one raw, untokenized sentence per line,
aligned by line), ``spm_<type><vocab>.model`` (trained from ``train.*`` when absent), and
``spm_<type><vocab>/`` with the encoded splits cached as ``.npy`` (token ids and line offsets).

Token ids: 0 pad, 1 unk, 2 bos, 3 eos (fixed at sentencepiece training time).

The tiny corpus ``numbers_en_de`` is real English → German: lines of one to three integers
written out by ``num2words`` (``"three thousand, two hundred and one; twelve"`` →
``"dreitausendzweihunderteins; zwölf"``), items separated by ``"; "`` (English numbers contain
commas).  Integers below 100 appear everywhere; of those from 100 to 9,999 a fixed 10 % are held
out of training and make up the validation and test lines, so BLEU measures how the model
composes the German number morphemes, not recall of seen lines.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .base import DataNotFoundError

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPLITS = ("train", "valid", "test")
LANGS = ("en", "de")


# -- the number-words corpus --------------------------------------------------------------
def _number_lines(
    pool: np.ndarray, small: np.ndarray, n_lines: int, rng: np.random.Generator
) -> tuple[list[str], list[str]]:
    from num2words import num2words

    words: dict[tuple[int, str], str] = {}

    def say(n: int, lang: str) -> str:
        if (n, lang) not in words:
            words[n, lang] = num2words(n, lang=lang)
        return words[n, lang]

    en, de = [], []
    for _ in range(n_lines):
        k = int(rng.integers(1, 4))
        nums = []
        for _ in range(k):
            # about a quarter each of 1-, 2-, 3- and 4-digit numbers
            digits = int(rng.integers(1, 5))
            src = small if digits <= 2 else pool
            lo, hi = (0, 10) if digits == 1 else (10 ** (digits - 1), 10**digits)
            cand = src[(src >= lo) & (src < hi)]
            nums.append(int(cand[rng.integers(len(cand))]))
        en.append("; ".join(say(n, "en") for n in nums))
        de.append("; ".join(say(n, "de") for n in nums))
    return en, de


def _atomic_write(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def make_numbers_corpus(
    out_dir: Path, *, n_train: int = 20_000, n_eval: int = 500, seed: int = 0
) -> Path:
    """Write the number-words corpus (train/valid/test × en/de) into ``out_dir`` unless all
    six files already exist; returns ``out_dir``."""
    if all((out_dir / f"{s}.{lang}").exists() for s in SPLITS for lang in LANGS):
        return out_dir
    rng = np.random.default_rng(seed)
    big = np.arange(100, 10_000)
    held = np.zeros(len(big), dtype=bool)
    held[rng.permutation(len(big))[: len(big) // 10]] = True
    small = np.arange(0, 100)
    sizes = {"train": n_train, "valid": n_eval, "test": n_eval}
    for split in SPLITS:
        pool = big[~held] if split == "train" else big[held]
        en, de = _number_lines(pool, small, sizes[split], rng)
        _atomic_write(out_dir / f"{split}.en", en)
        _atomic_write(out_dir / f"{split}.de", de)
    return out_dir


# -- raw text and sentencepiece -----------------------------------------------------------
def read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def check_raw(data_dir: Path, dataset: str, splits: Sequence[str] = SPLITS) -> None:
    missing = [
        f"{s}.{lang}" for s in splits for lang in LANGS if not (data_dir / f"{s}.{lang}").exists()
    ]
    if missing:
        raise DataNotFoundError(
            f"{dataset}: missing {', '.join(missing)} in {data_dir} (task.data_root/{dataset}). "
            "Provide raw, untokenized parallel text, one sentence per line: train.en/train.de "
            "(WMT14 en-de training data: Europarl v7, Common Crawl, News Commentary v9), "
            "valid.* (newstest2013) and test.* (newstest2014), e.g. from "
            "`sacrebleu -t wmt14 -l en-de --echo src` / `--echo ref` for the test set. "
            f"Check with: ngbench data {dataset} --root <data_root>"
        )


def spm_path(data_dir: Path, vocab_size: int, model_type: str = "unigram") -> Path:
    return data_dir / f"spm_{model_type}{vocab_size}.model"


def train_spm(
    data_dir: Path,
    *,
    vocab_size: int,
    model_path: Path,
    model_type: str = "unigram",
    input_sentence_size: int = 2_000_000,
    character_coverage: float = 1.0,
) -> Path:
    """Train a joined (en + de) sentencepiece model (``model_type`` unigram or bpe) of at most
    ``vocab_size`` pieces on ``train.*``; written atomically."""
    import sentencepiece as spm

    model_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_path.parent) as tmp:
        prefix = Path(tmp) / "spm"
        spm.SentencePieceTrainer.train(
            input=[str(data_dir / "train.en"), str(data_dir / "train.de")],
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            hard_vocab_limit=False,  # a small corpus may yield fewer pieces than asked for
            pad_id=PAD,
            unk_id=UNK,
            bos_id=BOS,
            eos_id=EOS,
            minloglevel=2,
            num_threads=os.cpu_count() or 1,
        )
        os.replace(f"{prefix}.model", model_path)
    return model_path


def load_spm(path: Path):  # -> sentencepiece.SentencePieceProcessor
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    if (sp.pad_id(), sp.bos_id(), sp.eos_id()) != (PAD, BOS, EOS):
        raise DataNotFoundError(
            f"sentencepiece model {path} must use pad=0, bos=2, eos=3 (got "
            f"{sp.pad_id()}, {sp.bos_id()}, {sp.eos_id()}); retrain it (delete the file)"
        )
    return sp


class Encoded:
    """One split, encoded: ``ids[offsets[i]:offsets[i+1]]`` is line ``i`` (no bos/eos)."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray):
        self.ids, self.offsets = ids, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def line(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    @classmethod
    def encode(cls, sp, lines: Sequence[str]) -> Encoded:
        pieces = sp.encode(list(lines), out_type=int, num_threads=os.cpu_count() or 1)
        lens = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
        offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        ids = np.fromiter((t for p in pieces for t in p), dtype=np.int32, count=int(offsets[-1]))
        return cls(ids, offsets)

    def save(self, stem: Path) -> None:
        stem.parent.mkdir(parents=True, exist_ok=True)
        for suffix, arr in ((".ids.npy", self.ids), (".offsets.npy", self.offsets)):
            fd, tmp = tempfile.mkstemp(dir=stem.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                np.save(f, arr)
            os.replace(tmp, f"{stem}{suffix}")

    @classmethod
    def load(cls, stem: Path) -> Encoded | None:
        a, b = Path(f"{stem}.ids.npy"), Path(f"{stem}.offsets.npy")
        if not (a.exists() and b.exists()):
            return None
        return cls(np.load(a), np.load(b))


def encoded_split(sp, data_dir: Path, split: str, lang: str, *, cache_dir: Path | None) -> Encoded:
    """The encoded ``<split>.<lang>``, cached under ``cache_dir`` when given."""
    stem = cache_dir / f"{split}.{lang}" if cache_dir is not None else None
    if stem is not None and (enc := Encoded.load(stem)) is not None:
        return enc
    enc = Encoded.encode(sp, read_lines(data_dir / f"{split}.{lang}"))
    if stem is not None:
        enc.save(stem)
    return enc


# -- batching -------------------------------------------------------------------------------
def length_batches(
    lengths: np.ndarray,
    perm: np.ndarray,
    *,
    batch_size: int,
    by: str,
    bucket: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Global batches of example indices, grouped by length.

    ``perm`` (a random order) is cut into chunks of ``bucket`` examples; each chunk is sorted by
    ``lengths`` and cut into batches: ``by="sentences"`` — exactly ``batch_size`` examples per
    batch (ragged chunk tails dropped); ``by="tokens"`` — as many examples as fit
    ``n × max(length in batch) <= batch_size`` (padded tokens, fairseq's ``--max-tokens``).
    The batch order is then shuffled with ``rng``.
    """
    out: list[np.ndarray] = []
    for s in range(0, len(perm), bucket):
        chunk = perm[s : s + bucket]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        if by == "sentences":
            for b in range(0, len(chunk) - batch_size + 1, batch_size):
                out.append(chunk[b : b + batch_size])
            continue
        start, longest = 0, 0
        for j, idx in enumerate(chunk):
            longest_j = max(longest, int(lengths[idx]))
            if (j - start + 1) * longest_j > batch_size and j > start:
                out.append(chunk[start:j])
                start, longest_j = j, int(lengths[idx])
            longest = longest_j
        if start < len(chunk):
            out.append(chunk[start:])
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def collate(src: Encoded, tgt: Encoded, idx: Sequence[int] | np.ndarray) -> dict[str, Tensor]:
    """Padded ``src`` (tokens + eos), ``tgt_in`` (bos + tokens) and ``tgt_out`` (tokens + eos)."""
    n = len(idx)
    s_lines = [src.line(int(i)) for i in idx]
    t_lines = [tgt.line(int(i)) for i in idx]
    s_len = max(len(x) for x in s_lines) + 1
    t_len = max(len(x) for x in t_lines) + 1
    s = np.full((n, s_len), PAD, dtype=np.int64)
    t_in = np.full((n, t_len), PAD, dtype=np.int64)
    t_out = np.full((n, t_len), PAD, dtype=np.int64)
    for r, (a, b) in enumerate(zip(s_lines, t_lines, strict=True)):
        s[r, : len(a)] = a
        s[r, len(a)] = EOS
        t_in[r, 0] = BOS
        t_in[r, 1 : len(b) + 1] = b
        t_out[r, : len(b)] = b
        t_out[r, len(b)] = EOS
    return {
        "src": torch.from_numpy(s),
        "tgt_in": torch.from_numpy(t_in),
        "tgt_out": torch.from_numpy(t_out),
    }
