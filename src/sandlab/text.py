"""Text normalization shared by dedup and decontamination: reformatted copies normalize alike."""

from __future__ import annotations

import hashlib
import re
from array import array

import numpy as np

_LATEX_NOISE = re.compile(r"\\(?:left|right|displaystyle|textstyle|mathrm|mathbf|text|textbf|operatorname|quad|qquad|[,;:! ])")
_NON_WORD = re.compile(r"[^0-9a-z]+")


def normalize_text(text: str) -> str:
    """Lower-case; drop LaTeX formatting commands, math delimiters and punctuation; collapse spaces.

    ``Find $\\dfrac{1}{2}$  of 10.`` and ``find \\frac{1}{2} of 10`` both become ``find frac 1 2 of 10``.
    """
    text = text.lower().replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = _LATEX_NOISE.sub(" ", text)
    return _NON_WORD.sub(" ", text).strip()


def word_ngrams(normalized: str, n: int) -> set[tuple[str, ...]]:
    """Word n-grams of normalized text; a text shorter than n is one n-gram of all its words."""
    words = normalized.split()
    if len(words) <= n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


# Word and n-gram hashes for many texts at once (dedup's MinHash shingles, decontamination's n-gram
# prefilter): per text only a split and a dict lookup per word run in Python.
ROLL = np.uint64(0x100000001B3)  # FNV-1a 64-bit prime: combines the word hashes of a shingle


def fmix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (wrapping uint64 arithmetic): spreads every input bit over the output."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint64(30))
        h = h * np.uint64(0xBF58476D1CE4E5B9)
        h = h ^ (h >> np.uint64(27))
        h = h * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def word_hashes(normalized: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The words of all (normalized) texts as one array of uint64 word hashes (blake2b of each distinct
    word, stable across runs and processes), each text's word count, and its first position."""
    vocab: dict[str, int] = {}
    ids = array("q")  # machine integers: a list of 10^8 Python ints would cost gigabytes
    lengths = np.empty(len(normalized), dtype=np.int64)
    for i, text in enumerate(normalized):
        words = text.split()
        lengths[i] = len(words)
        ids.extend([vocab.setdefault(w, len(vocab)) for w in words])
    word_hash = np.fromiter((int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little") for w in vocab),
                            dtype=np.uint64, count=len(vocab))
    starts = np.zeros(len(normalized), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return word_hash[np.frombuffer(ids, dtype=np.int64)] if ids else np.empty(0, dtype=np.uint64), lengths, starts


def ngram_hashes(hashes: np.ndarray, lengths: np.ndarray, starts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(hash of each word n-gram, index of its text), as ``word_ngrams`` cuts them: every run of n
    words inside one text, and a text shorter than n as one n-gram of all its words."""
    total = len(hashes)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    out, who = [], []
    if total >= n:
        rolled = hashes[: total - n + 1].copy()
        with np.errstate(over="ignore"):
            for t in range(1, n):
                rolled = rolled * ROLL ^ hashes[t : total - n + 1 + t]
        first = np.arange(total - n + 1)
        inside = first + n <= (starts + lengths)[owner[: total - n + 1]]
        out.append(rolled[inside])
        who.append(owner[: total - n + 1][inside])
    short = np.flatnonzero((lengths > 0) & (lengths < n))
    if short.size:
        rolled = hashes[starts[short]].copy()
        with np.errstate(over="ignore"):
            for t in range(1, n):
                more = t < lengths[short]
                nxt = hashes[np.minimum(starts[short] + t, total - 1)]
                rolled = np.where(more, rolled * ROLL ^ nxt, rolled)
        out.append(rolled)
        who.append(short)
    if not out:
        return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
    grams, texts = np.concatenate(out), np.concatenate(who)
    order = np.argsort(texts, kind="stable")
    return fmix64(grams[order]), texts[order]
