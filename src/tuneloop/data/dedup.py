"""Near-duplicate detection with MinHash LSH (datasketch).

A text becomes the set of character 5-grams of its normalized form (lower case, punctuation
dropped, runs of whitespace collapsed), hashed with xxhash into a MinHash of `num_perm` permutations. An LSH
index (bands tuned by datasketch for the threshold) proposes candidates in O(1) per query;
each candidate is then checked against its stored signature, so what is reported is an
estimated Jaccard similarity >= threshold, not just a shared band. Ingest keeps one index
per record kind for the new data and one over the eval prompts (eval-leak check).

Cost: ~130 us per signature and ~30 us per query+insert for a ~200-character text on one
core, constant per record, so a pass is linear in the number of records (bench/near_dup.py).
Memory: the signature (num_perm x 4 bytes) plus the LSH bands per indexed record.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

_WS = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]")
SHINGLE = 5


def shingles(text: str, n: int = SHINGLE) -> list[bytes]:
    t = _WS.sub(" ", _PUNCT.sub(" ", text.lower())).strip()
    if len(t) <= n:
        return [t.encode()]
    return list({t[i:i + n].encode() for i in range(len(t) - n + 1)})


class NearDupIndex:
    """Records keyed by id; `match` returns the most similar earlier record at or above the threshold."""

    def __init__(self, threshold: float, num_perm: int = 128) -> None:
        import xxhash
        from datasketch import MinHash, MinHashLSH

        self.threshold, self.num_perm = threshold, num_perm
        self._hash = xxhash.xxh32_intdigest
        self._proto = MinHash(num_perm=num_perm, hashfunc=self._hash)
        self._minhash = MinHash
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.signatures: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.signatures)

    def signature(self, text: str) -> Any:
        m = self._minhash(num_perm=self.num_perm, hashfunc=self._hash, permutations=self._proto.permutations,
                          scheme=self._proto.scheme)
        m.update_batch(shingles(text))
        return m

    def match(self, sig: Any) -> tuple[str, float] | None:
        best: tuple[str, float] | None = None
        hv = sig.hashvalues.astype(np.uint32)
        for key in self.lsh.query(sig):
            j = float(np.count_nonzero(self.signatures[key] == hv)) / self.num_perm
            if j >= self.threshold and (best is None or j > best[1]):
                best = (key, j)
        return best

    def add(self, key: str, sig: Any) -> None:
        if key in self.signatures:
            return
        self.lsh.insert(key, sig, check_duplication=False)
        self.signatures[key] = sig.hashvalues.astype(np.uint32)
