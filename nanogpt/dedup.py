"""Deduplication: exact (a hash of the normalised text) and near-duplicate (MinHash + LSH), in numpy.

    norm = normalise(text)
    key = exact_key(norm)                                   # 8 bytes; equal for texts equal after normalise()
    sig = MinHasher(bands, rows, shingle).signature(norm)   # (bands * rows,) uint32
    index = NearDupIndex(bands, rows, threshold)
    first = index.add(doc_id, sig)                          # None, or the id of an earlier near-duplicate

MinHash (Broder 1997): a document is its set of word `shingle`-grams of normalised words; each of bands * rows
hash functions h_i(x) = (a_i * x + b_i) mod 2^64 >> 32 (multiply-shift, a_i odd) keeps the smallest value over the
set, and two documents agree on a function with probability equal to their Jaccard similarity. LSH: the signature
is cut into `bands` bands of `rows` values; documents that agree on a whole band become candidates, with
probability 1 - (1 - J^rows)^bands (an S-curve around (1/bands)^(1/rows)); a candidate is a duplicate when the
fraction of the signature it shares with an earlier kept document is at least `threshold` (an estimate of J).
Everything is seeded, so the same input gives the same decisions in every process and run. The index holds, per
kept document, its band keys and signature: about bands * 90 + 4 * bands * rows bytes (e.g. 2.2 KB at 14 x 8).
"""
import hashlib
import re
import unicodedata
import zlib

import numpy as np

_PUNCTUATION = re.compile(r"[^\w\s]+")
_ASCII_PUNCTUATION = str.maketrans({chr(i): " " for i in range(128) if _PUNCTUATION.match(chr(i))})


def normalise(text):
    """Lower case, NFKC, punctuation dropped, whitespace runs as one space: what 'the same text' means here.
    ASCII text (already NFKC) takes a translate table instead of the regex: the same result, 5x faster."""
    if text.isascii():
        text = text.lower().translate(_ASCII_PUNCTUATION)
    else:
        text = _PUNCTUATION.sub(" ", unicodedata.normalize("NFKC", text).lower())
    return " ".join(text.split())


def exact_key(normalised):
    """8 bytes naming a normalised text (blake2b: the same in every process and run, unlike hash())."""
    return hashlib.blake2b(normalised.encode("utf-8"), digest_size=8).digest()


class MinHasher:
    """The bands * rows hash functions of a seeded MinHash, over word shingles of `shingle` words."""

    def __init__(self, bands=14, rows=8, shingle=5, seed=0):
        self.bands, self.rows, self.shingle = bands, rows, shingle
        rng = np.random.default_rng(seed)
        n = bands * rows
        self.a = rng.integers(1, 2**63, n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd multipliers
        self.b = rng.integers(0, 2**63, n, dtype=np.uint64)

    def shingles(self, normalised):
        """Distinct 64-bit hashes of the word shingle-grams of a normalised text (one gram for a shorter text)."""
        words = normalised.encode("utf-8").split()
        if not words:
            return np.zeros(1, dtype=np.uint64)
        h = np.fromiter(map(zlib.crc32, words), np.uint64, len(words))
        k = min(self.shingle, len(h))
        acc = np.zeros(len(h) - k + 1, dtype=np.uint64)
        for i in range(k):  # a polynomial hash of k consecutive word hashes, mod 2^64 (arrays wrap silently)
            acc = acc * np.uint64(0x100000001B3) + h[i:len(h) - k + 1 + i]
        return np.unique(acc)

    def signature(self, normalised):
        """The (bands * rows,) uint32 MinHash signature of a normalised text."""
        values = np.multiply(self.a[:, None], self.shingles(normalised)[None, :])  # in place from here: no copies
        values += self.b[:, None]
        values >>= np.uint64(32)
        return values.min(axis=1).astype(np.uint32)


def candidate_probability(jaccard, bands, rows):
    """Probability that LSH makes two documents of this Jaccard similarity candidates."""
    return 1.0 - (1.0 - jaccard ** rows) ** bands


def jaccard(a, b, shingle=5):
    """The exact Jaccard similarity of two texts' shingle sets (the reference the MinHash estimate is tested on)."""
    words_a, words_b = normalise(a).split(), normalise(b).split()
    sa = {tuple(words_a[i:i + shingle]) for i in range(max(1, len(words_a) - shingle + 1))}
    sb = {tuple(words_b[i:i + shingle]) for i in range(max(1, len(words_b) - shingle + 1))}
    return len(sa & sb) / max(1, len(sa | sb))


class NearDupIndex:
    """The LSH index of kept documents: add() answers whether a document nearly duplicates an earlier one."""

    def __init__(self, bands, rows, threshold):
        self.bands, self.rows, self.threshold = bands, rows, threshold
        self.buckets = [dict() for _ in range(bands)]
        self.signatures = []  # of kept documents, by their position in this list
        self.ids = []

    def add(self, doc_id, signature):
        """None when the document is kept (and indexed), else the id of the kept document it nearly duplicates."""
        keys = signature.reshape(self.bands, self.rows)
        candidates = []
        for band, key in zip(self.buckets, keys):
            found = band.get(key.tobytes())
            if found is not None:
                candidates.extend(found)
        for slot in dict.fromkeys(candidates):  # each once, in the order found
            if np.mean(self.signatures[slot] == signature) >= self.threshold:
                return self.ids[slot]
        slot = len(self.signatures)
        self.signatures.append(signature)
        self.ids.append(doc_id)
        for band, key in zip(self.buckets, keys):
            band.setdefault(key.tobytes(), []).append(slot)
        return None
