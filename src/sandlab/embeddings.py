"""Sentence embeddings (shared by dedup, decontamination, novelty and diversity).

Two kinds of model, chosen per stage by its ``embedding_model``: sentence-transformers models
(``embedded://all-minilm-l6-v2``, the default where quality matters; on ``device`` cpu/cuda) and
model2vec static models (``embedded://minilm-l6-static``, distilled from MiniLM: a token-embedding
lookup plus mean, ~100x faster on CPU, used for very large sets; thresholds differ, see DedupStage).
A run keeps what its stages embedded in an EmbeddingStore (data/embeddings), so each problem is
embedded once per model across dedup, decontamination, novelty, diversity and resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import unicodedata
from array import array
from functools import lru_cache
from pathlib import Path

import numpy as np

from sandlab.config import EMBEDDING_DEVICES
from sandlab.errors import ConfigError
from sandlab.models import cache_dir, resolve_model_path
from sandlab.text import SpanHasher, chunks_by_bytes

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> str:
    """``auto``: cuda when torch sees a GPU, else cpu. ``cuda`` without one stops with one line."""
    if device not in EMBEDDING_DEVICES:
        raise ConfigError(f"embedding device={device!r}: choose one of {list(EMBEDDING_DEVICES)}")
    if device == "cpu":
        return "cpu"
    import torch  # noqa: PLC0415

    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise ConfigError("embedding device='cuda' but torch sees no CUDA GPU; set the stage's embedding_device to auto or cpu")
    return "cuda" if available else "cpu"


def is_static_model(path: str) -> bool:
    """A model2vec static model (config.json with model_type model2vec)."""
    config = Path(path) / "config.json"
    if not config.exists():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "model2vec"
    except (OSError, ValueError):
        return False


@lru_cache(maxsize=2)
def _load(path: str, device: str = "cpu"):
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    return SentenceTransformer(path, device=device)


@lru_cache(maxsize=2)
def _load_static(path: str):
    try:
        from model2vec import StaticModel  # noqa: PLC0415
    except ImportError:
        raise ConfigError(f"embedding model {path} is a model2vec static model but model2vec is not installed; run: pip install -e . (or make models)") from None
    return StaticModel.from_pretrained(path)


def embed(
    texts: list[str], *, model: str = "embedded://all-minilm-l6-v2", batch_size: int = 64, progress: bool = True,
    cache: bool = False, device: str = "auto", store: Path | None = None,
) -> np.ndarray:
    """L2-normalized float32 embeddings, so inner product = cosine similarity.

    Dispatches on the model: model2vec static models run on CPU (numpy), sentence-transformers models
    on ``device`` (auto: cuda when torch sees one). ``cache=True`` keeps the result on disk keyed by
    model and texts: for fixed sets embedded on every run (the test benchmarks in decontamination).
    ``store``: an EmbeddingStore directory; only texts it does not hold yet are embedded (and added).
    """
    if store is not None:
        return EmbeddingStore(store).embed(
            texts, model, lambda missing: embed(missing, model=model, batch_size=batch_size, progress=progress, device=device))
    path = resolve_model_path(model, what="embedding_model")
    if cache:
        digest = hashlib.sha1("\x1e".join([path, *texts]).encode()).hexdigest()
        cached = cache_dir() / "embeddings" / f"{digest}.npy"
        if cached.exists():
            return np.load(cached)
        vectors = embed(texts, model=model, batch_size=batch_size, progress=progress, device=device)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.stem}-{os.getpid()}.npy")
        np.save(tmp, vectors)
        os.replace(tmp, cached)
        return vectors
    if is_static_model(path):
        return _embed_static_reusing_last(path, texts, batch_size)
    encoder = _load(path, resolve_device(device))
    vectors = encoder.encode(
        texts, batch_size=batch_size, show_progress_bar=progress and len(texts) > batch_size,
        convert_to_numpy=True, normalize_embeddings=True,
    )
    return np.asarray(vectors, dtype=np.float32)


@lru_cache(maxsize=8)
def model_identity(model: str) -> str:
    """What the model's files are (each file's name, size and first and last MiB), so rebuilt or updated
    weights under the same name are a new model; a Hub id that is not a local directory is its name."""
    path = Path(resolve_model_path(model, what="embedding_model"))
    digest = hashlib.sha1(model.encode())
    if path.is_dir():
        for file in sorted(f for f in path.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)):
            size = file.stat().st_size
            digest.update(f"{file.relative_to(path)}\0{size}\0".encode())
            with open(file, "rb") as fh:
                digest.update(fh.read(1 << 20))
                if size > 2 << 20:
                    fh.seek(-(1 << 20), os.SEEK_END)
                    digest.update(fh.read())
    return digest.hexdigest()[:12]


class EmbeddingStore:
    """Embeddings already computed in a run, by model and text: ``<directory>/<model>-<identity>/part-*``.

    A part is the new texts of one ``embed`` call: their 16-byte blake2b digests (``.keys.npy``, written
    last, so a part without one was cut short and is ignored) and float32 vectors (``.vectors.npy``,
    memory-mapped when read), each file synced before it gets its name. Parts are never rewritten, so
    writers do not collide. A part that does not read back whole is skipped with a warning.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def folder(self, model: str) -> Path:
        # By the model as the recipe names it plus what its files are: a resume on a node where it lives
        # elsewhere finds it, a rebuilt model does not.
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", model).strip("-")[-48:]
        return self.directory / f"{slug}-{model_identity(model)}"

    @staticmethod
    def digests(texts: list[str]) -> list[bytes]:
        return [hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).digest() for t in texts]

    def parts(self, model: str):
        """(keys as bytes, memory-mapped vectors) of each whole part, oldest first."""
        width = None
        for keys_file in sorted(self.folder(model).glob("part-*.keys.npy")):
            vectors_file = keys_file.with_name(keys_file.name.removesuffix(".keys.npy") + ".vectors.npy")
            try:
                keys = np.load(keys_file)
                vectors = np.load(vectors_file, mmap_mode="r")
                problem = ("keys are not (n, 16) bytes" if keys.dtype != np.uint8 or keys.ndim != 2 or keys.shape[1] != 16 else
                           "vectors are not (n, d) float32" if vectors.dtype != np.float32 or vectors.ndim != 2 else
                           f"{len(keys)} keys for {len(vectors)} vectors" if len(keys) != len(vectors) else
                           f"{vectors.shape[1]}-d vectors after {width}-d ones" if width not in (None, vectors.shape[1]) else None)
            except Exception as exc:  # noqa: BLE001 - any unreadable part is a cache miss, embedded again
                problem = f"{type(exc).__name__}: {exc}"
            if problem:
                log.warning("embedding store: ignoring %s (%s)", keys_file, problem)
                continue
            width = vectors.shape[1]
            yield keys.tobytes(), vectors

    def add(self, model: str, digests: list[bytes], vectors: np.ndarray) -> None:
        folder = self.folder(model)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"part-{time.time_ns()}-{os.getpid()}"
        for suffix, array_ in ((".vectors.npy", np.ascontiguousarray(vectors, dtype=np.float32)),
                               (".keys.npy", np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, 16))):
            tmp = folder / f".{name}{suffix}"
            with open(tmp, "wb") as fh:
                np.save(fh, array_)
                fh.flush()
                os.fsync(fh.fileno())  # a crash after the rename must not leave an empty file under the name
            os.replace(tmp, folder / f"{name}{suffix}")

    def embed(self, texts: list[str], model: str, compute) -> np.ndarray:
        """``texts``' vectors: stored ones, and ``compute(new texts)`` (added to the store) for the rest."""
        if not texts:
            return compute([])
        digests = self.digests(texts)
        slot: dict[bytes, int] = {}  # digest -> row of the distinct texts' array
        firsts: list[int] = []  # the first text of each row
        for i, d in enumerate(digests):
            if d not in slot:
                slot[d] = len(firsts)
                firsts.append(i)
        distinct: np.ndarray | None = None
        have = np.zeros(len(firsts), dtype=bool)
        for raw, vectors in self.parts(model):
            rows, at = [], []
            for row in range(len(raw) // 16):
                s = slot.get(raw[16 * row : 16 * row + 16])
                if s is not None and not have[s]:
                    rows.append(row)
                    at.append(s)
                    have[s] = True
            if rows:
                if distinct is None:
                    distinct = np.empty((len(firsts), vectors.shape[1]), dtype=np.float32)
                distinct[at] = vectors[rows]
        missing = np.flatnonzero(~have)
        stored = int(have[[slot[d] for d in digests]].sum())
        if missing.size:
            fresh = np.asarray(compute([texts[firsts[s]] for s in missing.tolist()]), dtype=np.float32)
            if distinct is None:
                distinct = np.empty((len(firsts), fresh.shape[1]), dtype=np.float32)
            elif fresh.shape[1] != distinct.shape[1]:
                raise ConfigError(f"embedding store {self.folder(model)} holds {distinct.shape[1]}-d vectors but {model} gives "
                                  f"{fresh.shape[1]}-d ones; delete that folder")
            self.add(model, [digests[firsts[s]] for s in missing.tolist()], fresh)
            distinct[missing] = fresh
        log.info("embeddings (%s): %d of %d texts from %s, %d embedded", model, stored, len(texts), self.directory, missing.size)
        return distinct if len(firsts) == len(texts) else distinct[[slot[d] for d in digests]]


# BERT-style pre-tokenization of ASCII text (lower case, words of letters and digits, every other
# printable character its own piece) as the distilled model's tokenizer does it; non-ASCII text is
# split by _UnicodePieces; text with ASCII control characters goes through the tokenizer itself.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


_ASCII_PUNCTUATION = "".join(chr(c) for c in range(33, 127) if not chr(c).isalnum())
_ALNUM_BYTES = np.zeros(256, dtype=bool)
_ALNUM_BYTES[list(b"0123456789abcdefghijklmnopqrstuvwxyz")] = True
_PUNCTUATION_BYTES = np.zeros(256, dtype=bool)
_PUNCTUATION_BYTES[list(_ASCII_PUNCTUATION.encode())] = True


def _ascii_piece_columns(texts: list[str], columns: dict[str, int], *, chunk_bytes: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """The pieces of all (ASCII, control-free) texts at once, as ``[a-z0-9]+|[^a-z0-9\\s]`` cuts the
    lower-cased text, as (pieces per text, column of each piece in ``columns``, which gains the new
    pieces): found and hashed on the joined bytes; Python runs once per distinct piece of a chunk."""
    sizes = np.fromiter((len(t) + 1 for t in texts), dtype=np.int64, count=len(texts))
    largest, bounds = chunks_by_bytes(sizes, chunk_bytes)
    hasher = SpanHasher(largest)
    known: dict[int, int] = {}  # piece hash -> column
    counts, cols = [], []
    for lo, hi in bounds:
        joined = "\n".join(texts[lo:hi]).lower()
        data = np.frombuffer(joined.encode(), dtype=np.uint8)
        alnum, punct = _ALNUM_BYTES[data], _PUNCTUATION_BYTES[data]
        starts = np.flatnonzero(punct | (alnum & ~np.concatenate([[False], alnum[:-1]])))
        ends = np.flatnonzero(punct | (alnum & ~np.concatenate([alnum[1:], [False]]))) + 1
        text_ends = np.cumsum(sizes[lo:hi]) - 1  # offset of the separator after each text
        counts.append(np.bincount(np.searchsorted(text_ends, starts), minlength=hi - lo))
        unique, first, inverse = np.unique(hasher(data, starts, ends), return_index=True, return_inverse=True)
        mapped = np.empty(len(unique), dtype=np.int64)
        for u, (h, f) in enumerate(zip(unique.tolist(), first.tolist())):
            col = known.get(h)
            if col is None:
                col = known[h] = columns.setdefault(joined[starts[f] : ends[f]], len(columns))
            mapped[u] = col
        cols.append(mapped[inverse.ravel()].astype(np.int32))
    if not bounds:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
    return np.concatenate(counts), np.concatenate(cols)


def _is_bert_punctuation(char: str) -> bool:
    return char in _ASCII_PUNCTUATION or unicodedata.category(char).startswith("P")


class _UnicodePieces:
    """BERT pre-tokenization of text with non-ASCII characters, read off the raw text: pieces are runs of
    word characters and single punctuation (or CJK) characters, split at whitespace, as the tokenizer
    cuts them after its normalizer (clean-up, CJK spacing, accents stripped, lower case).

    Each distinct non-ASCII character is classified once by running the tokenizer's own normalizer on
    it; a character whose class could change with its neighbours, or that Python's whitespace and
    BERT's disagree on, makes its text go through ``model.encode`` instead (``pieces`` returns None).
    Pieces keep their case: the tokenizer lower-cases each one as it does in context (character by
    character, so no final-sigma rule)."""

    def __init__(self, tokenizer):
        self.normalize = tokenizer.normalizer.normalize_str
        self.kinds: dict[str, str] = {}  # non-ASCII character -> word | space | punct | unsafe
        self.punctuation = ""
        self.pattern = self._compile()

    def _compile(self) -> re.Pattern:
        punct = re.escape(_ASCII_PUNCTUATION + self.punctuation)
        return re.compile(rf"[^\s{punct}]+|[{punct}]")

    def _kind(self, char: str) -> str:
        normalized, space = self.normalize(char), char.isspace()
        if not normalized:  # removed (control, format, combining mark): joins its neighbours, as in context
            return "unsafe" if space else "word"
        if normalized.isspace() or space:
            return "space" if normalized.isspace() and space else "unsafe"
        if len(normalized) == 1 and _is_bert_punctuation(normalized):
            return "punct"
        if len(normalized) == 3 and normalized[0] == normalized[2] == " ":
            return "punct"  # a CJK character, set apart by the normalizer: its own piece
        if any(c.isspace() or _is_bert_punctuation(c) for c in normalized):
            return "unsafe"
        return "word"

    def pieces(self, text: str) -> list[str] | None:
        new = {char for char in set(text) if not char.isascii() and char not in self.kinds}
        for char in new:
            self.kinds[char] = self._kind(char)
        # Learned punctuation joins the pattern now, even if this text goes to model.encode.
        if learned := "".join(char for char in new if self.kinds[char] == "punct"):
            self.punctuation += learned
            self.pattern = self._compile()
        if any(self.kinds.get(char) == "unsafe" for char in set(text)):
            return None
        return self.pattern.findall(text)


# path -> ({text: row}, normalized vectors) of the last static-model call in this process: dedup and then
# decontamination of the records it kept (one data job) embed each text once.
_LAST_STATIC: dict[str, tuple[dict[str, int], np.ndarray]] = {}


def _embed_static_reusing_last(path: str, texts: list[str], batch_size: int) -> np.ndarray:
    if not texts:
        return np.zeros((0, _load_static(path).dim), dtype=np.float32)
    rows_of, previous = _LAST_STATIC.pop(path, ({}, None))
    rows = np.fromiter((rows_of.get(t, -1) for t in texts), dtype=np.int64, count=len(texts))
    missing = np.flatnonzero(rows < 0)
    out = np.empty((len(texts), previous.shape[1] if previous is not None else 0), dtype=np.float32)
    if missing.size:
        fresh = encode_static(_load_static(path), [texts[i] for i in missing.tolist()], batch_size=batch_size)
        fresh /= np.maximum(np.linalg.norm(fresh, axis=1, keepdims=True), 1e-12)
        out = np.empty((len(texts), fresh.shape[1]), dtype=np.float32)
        out[missing] = fresh
    if previous is not None and missing.size < len(texts):
        known = np.flatnonzero(rows >= 0)
        out[known] = previous[rows[known]]
    del rows_of, previous
    _LAST_STATIC.clear()  # one model's vectors at a time
    _LAST_STATIC[path] = ({t: i for i, t in enumerate(texts)}, out)
    return out.copy()


def _bag_matrix(per_row: np.ndarray, cols: np.ndarray, width: int):
    """Rows of piece counts: row i holds the next ``per_row[i]`` entries of ``cols``."""
    import scipy.sparse  # noqa: PLC0415

    indptr = np.zeros(len(per_row) + 1, dtype=np.int64)
    np.cumsum(per_row, out=indptr[1:])
    return scipy.sparse.csr_matrix((np.ones(len(cols), dtype=np.float32), cols, indptr), shape=(len(per_row), width))


def encode_static(model, texts: list[str], *, batch_size: int = 1024) -> np.ndarray:
    """model2vec's ``encode`` (mean of the token embeddings, unknown tokens dropped) with each distinct
    word tokenized once: a static model's mean depends only on the bag of tokens, and WordPiece cuts each
    pre-tokenized word alone, so a text's tokens are its words' tokens. ASCII texts are cut into pieces
    all at once on their joined bytes, others by ``_UnicodePieces``. Texts the shortcut cannot read
    exactly (ASCII control characters, rare non-ASCII ones, or long enough for model2vec's truncation)
    and models with token weights or a token mapping use ``model.encode`` itself. Equal to it up to
    float16 rounding (tests/test_embeddings.py)."""
    n = len(texts)
    if not n:
        return np.zeros((0, model.dim), dtype=np.float32)
    if getattr(model, "token_mapping", None) is not None or getattr(model, "weights", None) is not None:
        return np.asarray(model.encode(texts, batch_size=max(batch_size, 1024), show_progress_bar=False), dtype=np.float32).reshape(n, -1)
    max_length = model.max_length
    char_cap = max_length * model.median_token_length if max_length else None
    columns: dict[str, int] = {}
    cols = array("i")  # machine integers (a Python list of 10^8 ints would cost gigabytes)
    lengths = np.zeros(n, dtype=np.int64)
    slow: list[int] = []
    plain: list[int] = []  # ASCII texts: their pieces are found for all of them at once
    specials = [t.content for t in model.tokenizer.get_added_tokens_decoder().values()]
    special = re.compile("|".join(map(re.escape, specials)), re.IGNORECASE) if specials else None
    unicode_pieces = None
    for i, text in enumerate(texts):
        if (_CONTROL.search(text) or (char_cap is not None and len(text) > char_cap)
                or (special is not None and special.search(text))):  # "[UNK]" written in a text is one token
            slow.append(i)
            continue
        if text.isascii():
            plain.append(i)
            continue
        unicode_pieces = unicode_pieces or _UnicodePieces(model.tokenizer)
        words = unicode_pieces.pieces(text)
        if words is None:
            slow.append(i)
            continue
        lengths[i] = len(words)
        cols.extend([columns.setdefault(w, len(columns)) for w in words])
    plain_lengths, plain_cols = _ascii_piece_columns([texts[i] for i in plain], columns)
    table = np.asarray(model.embedding, dtype=np.float32)
    dim = table.shape[1]
    word_sum = np.zeros((len(columns), dim), dtype=np.float32)
    word_tokens = np.zeros(len(columns), dtype=np.float32)  # tokens kept (unknown ones dropped)
    word_all = np.zeros(len(columns), dtype=np.int64)  # tokens before dropping: model2vec truncates on these
    if columns:
        unk, vocab = model.unk_token_id, list(columns)
        for lo in range(0, len(vocab), 65536):
            for w, enc in enumerate(model.tokenizer.encode_batch_fast(vocab[lo : lo + 65536], add_special_tokens=False), start=lo):
                ids = [t for t in enc.ids if t != unk]
                word_all[w], word_tokens[w] = len(enc.ids), len(ids)
                if ids:
                    word_sum[w] = table[ids].sum(axis=0)
    plain_per_row = np.zeros(n, dtype=np.int64)
    plain_per_row[plain] = plain_lengths
    bags = _bag_matrix(lengths, np.frombuffer(cols, dtype=np.int32), len(columns)) + _bag_matrix(plain_per_row, plain_cols, len(columns))
    vectors = np.asarray(bags @ word_sum, dtype=np.float32)
    tokens = bags @ word_tokens
    if max_length:  # more tokens than model2vec keeps: its own truncation decides
        slow += np.flatnonzero(bags @ word_all.astype(np.float32) > max_length).tolist()
    vectors /= np.maximum(tokens, 1.0)[:, None]
    if slow:
        slow = sorted(set(slow))
        vectors[slow] = np.asarray(model.encode([texts[i] for i in slow], batch_size=max(batch_size, 1024),
                                                show_progress_bar=False, use_multiprocessing=False), dtype=np.float32)
    return vectors


def similar_pairs(
    vectors: np.ndarray, *, threshold: float, k: int = 10, ivf_min_records: int = 20000, nprobe: int = 8,
    earlier_only: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of rows of normalized ``vectors`` at cosine >= ``threshold``: arrays (row, other, cosine),
    other < row with ``earlier_only`` (else any other row), at most the ``k`` closest per row, sorted by
    row, then cosine descending, then other.

    Below ``ivf_min_records`` rows this is exact: blocks of rows against the (earlier) rows as matrix
    products. Above, an inverted-file self-join: faiss k-means cells (about 2*sqrt(n)), each row probes
    its ``nprobe`` nearest cells, and each cell's members meet every row that probes it in one matrix
    product. That covers the candidates faiss's IVF search scans at the same ``nprobe``, but as BLAS
    products per cell instead of one query at a time (1M rows on 2 cores: 50 s against 140 s for
    building and searching faiss's IVF index; docs/PERFORMANCE.md, "Dedup and decontamination of real text")."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(vectors)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    held = 0
    limit = 4 * k * max(n, 1)  # pairs held before pruning to the k best per row (bounded memory)

    def collect(rows: np.ndarray, cols: np.ndarray, scores: np.ndarray) -> None:
        nonlocal held
        r, c = np.nonzero(scores >= threshold)  # few: test the (earlier) other only on these
        other = cols[c] < rows[r] if earlier_only else cols[c] != rows[r]
        r, c = r[other], c[other]
        if r.size:
            found.append((rows[r], cols[c], scores[r, c]))
            held += r.size
            if held > limit:
                found[:] = [_k_best(*_concat(found), k)]
                held = found[0][0].size

    if n < 2:
        pass
    elif n < ivf_min_records:
        block = max(1, (1 << 24) // n)  # a block's score matrix stays near 64 MB
        everyone = np.arange(n)
        for lo in range(0, n, block):
            hi = min(lo + block, n)
            width = hi if earlier_only else n
            collect(everyone[lo:hi], everyone[:width], vectors[lo:hi] @ vectors[:width].T)
    else:
        import faiss  # noqa: PLC0415

        nlist = int(2 * np.sqrt(n))
        kmeans = faiss.Kmeans(vectors.shape[1], nlist, niter=10, seed=0, spherical=True, min_points_per_centroid=1)
        kmeans.train(vectors[np.random.default_rng(0).choice(n, size=min(n, 40 * nlist), replace=False)])
        quantizer = faiss.IndexFlatIP(vectors.shape[1])
        quantizer.add(kmeans.centroids)
        _, probes = quantizer.search(vectors, min(nprobe, nlist))  # probes[:, 0]: the row's own cell
        members = np.argsort(probes[:, 0], kind="stable")
        member_bounds = np.searchsorted(probes[members, 0], np.arange(nlist + 1))
        probe_rows = np.repeat(np.arange(n), probes.shape[1])
        by_cell = np.argsort(probes.ravel(), kind="stable")
        probers, prober_cells = probe_rows[by_cell], probes.ravel()[by_cell]
        prober_bounds = np.searchsorted(prober_cells, np.arange(nlist + 1))
        for cell in range(nlist):
            cols = members[member_bounds[cell] : member_bounds[cell + 1]]
            rows = probers[prober_bounds[cell] : prober_bounds[cell + 1]]
            if cols.size and rows.size:
                collect(rows, cols, vectors[rows] @ vectors[cols].T)
    if not found:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    return _k_best(*_concat(found), k)


def _concat(parts):
    return tuple(np.concatenate([part[i] for part in parts]) for i in range(3))


def _k_best(rows: np.ndarray, cols: np.ndarray, scores: np.ndarray, k: int):
    """The k best pairs per row, sorted by row, cosine descending, col (each pair is met once: a row
    probes distinct cells and a column lives in one)."""
    order = np.lexsort((cols, -scores, rows))
    rows, cols, scores = rows[order], cols[order], scores[order]
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    rank = np.arange(rows.size) - np.repeat(starts, np.diff(np.r_[starts, rows.size]))
    keep = rank < k
    return rows[keep].astype(np.int64), cols[keep].astype(np.int64), scores[keep]


def inner_product_index(vectors: np.ndarray, *, ivf_min_records: int = 20000, nprobe: int = 8):
    """A faiss inner-product index over normalized ``vectors``: exact (flat) below ``ivf_min_records``,
    IVF above it (about 4*sqrt(n) lists, ``nprobe`` searched), so search cost grows close to linearly
    with the corpus instead of with all pairs."""
    import faiss  # noqa: PLC0415

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if n < ivf_min_records:
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = int(4 * np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors[np.random.default_rng(0).choice(n, size=min(n, 40 * nlist), replace=False)])
        index.nprobe = nprobe
    index.add(vectors)
    return index
