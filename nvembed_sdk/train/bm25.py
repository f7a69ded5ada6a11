"""A small Okapi BM25 in NumPy/SciPy: the mining teacher and the lexical baseline.

Tokens are lower-cased ``\\w+`` matches. A document's weight for term ``t`` is

    idf(t) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len / avg_len)),
    idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5))       (Lucene's non-negative idf)

and a query's score is the sum of its tokens' weights (a repeated query token counts again).
All document weights live in one sparse (docs, vocab) matrix, so scoring a block of queries is
one sparse matrix product.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

_TOKEN = re.compile(r"\w+")


def bm25_tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


class BM25:
    """Okapi BM25 over a fixed corpus.

    Args:
        corpus: the documents.
        k1: term-frequency saturation. Defaults to 0.9.
        b: length normalisation. Defaults to 0.4.
    """

    def __init__(self, corpus: Sequence[str], k1: float = 0.9, b: float = 0.4) -> None:
        from scipy import sparse

        self.k1, self.b = k1, b
        self.vocab: dict[str, int] = {}
        rows, cols = [], []
        lengths = np.zeros(len(corpus), dtype=np.float64)
        for i, doc in enumerate(corpus):
            toks = bm25_tokens(doc)
            lengths[i] = len(toks)
            for t in toks:
                cols.append(self.vocab.setdefault(t, len(self.vocab)))
            rows.extend([i] * len(toks))
        n_docs, n_terms = len(corpus), max(len(self.vocab), 1)
        # Duplicate (row, col) pairs are summed by the CSR constructor: that is the term frequency.
        tf = sparse.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(n_docs, n_terms), dtype=np.float64)
        tf.sum_duplicates()
        df = np.bincount(tf.indices, minlength=n_terms)
        self.idf = np.log1p((n_docs - df + 0.5) / (df + 0.5))  # (V,)
        avg = lengths.mean() if n_docs else 1.0
        norm = k1 * (1.0 - b + b * lengths / max(avg, 1e-9))  # (D,)
        tf_data = tf.data
        row_of = np.repeat(np.arange(n_docs), np.diff(tf.indptr))
        data = self.idf[tf.indices] * tf_data * (k1 + 1.0) / (tf_data + norm[row_of])
        # (V, D) so that (Q, V) @ (V, D) gives scores; float32 halves memory.
        self.weights = sparse.csr_matrix((data.astype(np.float32), tf.indices, tf.indptr),
                                         shape=(n_docs, n_terms)).T.tocsr()
        self.n_docs = n_docs

    def _query_matrix(self, queries: Sequence[str]):
        from scipy import sparse

        rows, cols = [], []
        for i, q in enumerate(queries):
            for t in bm25_tokens(q):
                j = self.vocab.get(t)
                if j is not None:
                    rows.append(i)
                    cols.append(j)
        return sparse.csr_matrix((np.ones(len(cols), dtype=np.float32), (rows, cols)),
                                 shape=(len(queries), self.weights.shape[0]))

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """Dense (Q, D) float32 scores; call it on blocks of a few hundred queries."""
        return np.asarray((self._query_matrix(queries) @ self.weights).todense(), dtype=np.float32)

    def search(self, queries: Sequence[str], k: int, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` documents per query: (indices (Q, k), scores (Q, k)), best first."""
        k = min(k, self.n_docs)
        idx = np.zeros((len(queries), k), dtype=np.int64)
        val = np.zeros((len(queries), k), dtype=np.float32)
        for lo in range(0, len(queries), block):
            s = self.scores(queries[lo : lo + block])
            top = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < s.shape[1] else np.tile(np.arange(k), (len(s), 1))
            top_s = np.take_along_axis(s, top, axis=1)
            order = np.argsort(-top_s, axis=1, kind="stable")
            idx[lo : lo + len(s)] = np.take_along_axis(top, order, axis=1)
            val[lo : lo + len(s)] = np.take_along_axis(top_s, order, axis=1)
        return idx, val


__all__ = ["BM25", "bm25_tokens"]
