"""Text normalization shared by dedup and decontamination: reformatted copies normalize alike."""

from __future__ import annotations

import re

import numpy as np

_LATEX_NOISE = re.compile(r"\\(?:left|right|displaystyle|textstyle|mathrm|mathbf|text|textbf|operatorname|quad|qquad|[,;:! ])")
_WORD_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"
# Every character but [0-9a-z] becomes a space (then runs of spaces collapse): a byte table for ASCII
# text, a code-point table for the rest.
_ASCII_TO_SPACE = bytes(c if chr(c) in _WORD_CHARS else 32 for c in range(256))


class _ToSpace(dict):
    def __missing__(self, key: int) -> int:
        return 32


_UNICODE_TO_SPACE = _ToSpace({ord(c): ord(c) for c in _WORD_CHARS})


def normalize_text(text: str) -> str:
    """Lower-case; drop LaTeX formatting commands, math delimiters and punctuation; collapse spaces.

    ``Find $\\dfrac{1}{2}$  of 10.`` and ``find \\frac{1}{2} of 10`` both become ``find frac 1 2 of 10``.
    """
    text = text.lower()
    if "\\" in text:
        text = _LATEX_NOISE.sub(" ", text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac"))
    if text.isascii():  # bytes.translate: about 2x faster than a regex substitution over a million texts
        return " ".join(text.encode().translate(_ASCII_TO_SPACE).decode().split())
    return " ".join(text.translate(_UNICODE_TO_SPACE).split())


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


_POLY = 0x9E3779B97F4A7C15  # odd, so invertible modulo 2^64
_POLY_INVERSE = pow(_POLY, -1, 1 << 64)
_WORD_BYTES = np.zeros(256, dtype=bool)
_WORD_BYTES[list(b"0123456789abcdefghijklmnopqrstuvwxyz ")] = True


class SpanHasher:
    """64-bit hashes of byte spans of joined texts: a polynomial hash of the span's bytes modulo 2^64
    (base ``_POLY``) with its length, mixed by ``fmix64``; stable across runs and processes. Spans are
    hashed all at once from prefix sums, so no Python code runs per span."""

    def __init__(self, size: int):
        with np.errstate(over="ignore"):
            # P^i and P^-i (mod 2^64) for every byte offset of a chunk of up to ``size`` bytes
            self.powers = np.cumprod(np.full(size + 1, _POLY, dtype=np.uint64)) * np.uint64(_POLY_INVERSE)
            self.inverse = np.cumprod(np.full(size + 1, _POLY_INVERSE, dtype=np.uint64)) * np.uint64(_POLY)

    def __call__(self, data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            prefix = np.zeros(data.size + 1, dtype=np.uint64)
            np.cumsum(data * self.powers[: data.size], out=prefix[1:])
            # sum of byte_i * P^(i - start) over the span: its prefix difference moved back to offset 0
            poly = (prefix[ends] - prefix[starts]) * self.inverse[starts]
            return fmix64(poly ^ (ends - starts).astype(np.uint64) * np.uint64(_POLY))


def chunks_by_bytes(sizes: np.ndarray, chunk_bytes: int) -> tuple[int, list[tuple[int, int]]]:
    """(largest chunk, [(lo, hi), ...]): consecutive items of ``sizes`` bytes each (separator included)
    grouped into chunks of about ``chunk_bytes``; an item larger than that is a chunk of its own."""
    ends_at = np.cumsum(sizes)
    bounds, lo = [], 0
    while lo < len(sizes):
        hi = max(int(np.searchsorted(ends_at, ends_at[lo] - sizes[lo] + chunk_bytes, "right")), lo + 1)
        bounds.append((lo, hi))
        lo = hi
    return max((int(ends_at[hi - 1] - ends_at[lo] + sizes[lo]) for lo, hi in bounds), default=0), bounds


def word_hashes(normalized: list[str], *, chunk_bytes: int = 1 << 22) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The words of all normalized texts (``normalize_text``: words of [0-9a-z] between single spaces)
    as one array of uint64 word hashes (``SpanHasher``), each text's word count, and its first position."""
    lengths = np.fromiter((text.count(" ") + 1 if text else 0 for text in normalized), dtype=np.int64, count=len(normalized))
    largest, bounds = chunks_by_bytes(np.fromiter((len(text) + 1 for text in normalized), dtype=np.int64, count=len(normalized)), chunk_bytes)
    hasher, parts = SpanHasher(largest), []
    for lo, hi in bounds:
        texts = [text for text in normalized[lo:hi] if text]
        if not texts:
            continue
        data = np.frombuffer(" ".join(texts).encode(), dtype=np.uint8)
        if not _WORD_BYTES[data].all():
            raise ValueError("word_hashes needs normalized text (normalize_text): words of [0-9a-z] between single spaces")
        spaces = np.flatnonzero(data == 32)
        parts.append(hasher(data, np.concatenate([[0], spaces + 1]), np.concatenate([spaces, [data.size]])))
    starts = np.zeros(len(normalized), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return (np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)), lengths, starts


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
