"""Corpus embedding jobs: a corpus in, Parquet vectors out, in-process or on Ray Data (resumable).

Names only; pyarrow and ray load when a job runs (``pip install -e '.[ray]'``).
"""

from __future__ import annotations

from nvembed_sdk.corpus.job import CorpusJob, run_local
from nvembed_sdk.corpus.source import CorpusSource, Part
from nvembed_sdk.corpus.store import read_vectors


def run_ray(*args, **kwargs):
    """See :func:`nvembed_sdk.corpus.ray_job.run_ray`."""
    from nvembed_sdk.corpus.ray_job import run_ray as impl

    return impl(*args, **kwargs)


__all__ = ["CorpusJob", "CorpusSource", "Part", "read_vectors", "run_local", "run_ray"]
