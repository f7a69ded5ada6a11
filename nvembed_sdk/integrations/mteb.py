"""MTEB (2.x) over any NV-Embed artifact: ``NVEmbedModel``, ``local_retrieval_task``, ``evaluate_mteb``.

``NVEmbedModel`` implements MTEB's encoder protocol. The instruction for a task comes from a
table shaped like the released ``instructions.json`` (``{task: {"query": ..., "corpus": ...}}``
or ``{task: {"text": ...}}`` or ``{task: "..."}``), then from the task's own ``prompt``, then
the SDK's default task; ``prompt_type`` query (and symmetric tasks, no prompt type) gets
``Instruct: {task}\\nQuery: ``, document gets the table's ``corpus`` entry (usually none). The
instruction is masked out of pooling as in :class:`~nvembed_sdk.Embedder`.

``local_retrieval_task(dir)`` is an offline MTEB retrieval task over a BEIR-layout folder
(``corpus.jsonl(.gz)``, ``queries.jsonl(.gz)``, ``qrels.tsv`` or ``qrels/test.tsv``, optional
``instruction.txt``), read with the same reader as ``nvembed eval``, so MTEB scores the same
texts; nothing is fetched from a hub.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from nvembed_sdk.embedder import DEFAULT_TASK, query_instruction
from nvembed_sdk.errors import ArtifactError, InputError, fmt

_BUILT: dict[str, type] = {}
__all__ = ["NVEmbedModel", "evaluate_mteb", "instruction_for", "local_retrieval_task", "read_instructions"]  # noqa: F822


def read_instructions(table: str | Path | dict | None) -> dict[str, Any]:
    """An instruction table: a dict, or a JSON file like the released ``instructions.json``."""
    if table is None:
        return {}
    if isinstance(table, dict):
        return dict(table)
    p = Path(table)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(fmt("instructions", f"{p} ({exc})", "a JSON file {task: {query, corpus}}")) from exc
    if not isinstance(data, dict):
        raise ArtifactError(fmt("instructions", type(data).__name__, "a JSON object {task: {query, corpus}}"))
    return data


def instruction_for(table: dict[str, Any], task_name: str, task_prompt: Any, prompt_type: str | None) -> str:
    """The full instruction prefix for one side of one task (see the module docstring)."""
    side = "document" if prompt_type == "document" else "query"
    entry = table.get(task_name)
    task: str | None = None
    if isinstance(entry, dict):
        task = entry.get("corpus", "") if side == "document" else entry.get("query", entry.get("text"))
    elif isinstance(entry, str):
        task = "" if side == "document" else entry
    elif isinstance(task_prompt, dict):
        task = task_prompt.get(side, "")
    elif isinstance(task_prompt, str):
        task = "" if side == "document" else task_prompt
    if task is None:
        task = "" if side == "document" else DEFAULT_TASK
    return query_instruction(task) if task else ""


def _build() -> None:
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction

    from nvembed_sdk.integrations._shared import open_embedder

    class NVEmbedModel(AbsEncoder):
        """An NV-Embed artifact as an MTEB encoder.

        Args:
            path: checkpoint dir, bundle dir, ``model.onnx`` or ``engine.plan``.
            instructions: task -> instruction table (dict or JSON path). Defaults to none
                (each task's own prompt, else the SDK's default task).
            batch_size: texts per forward pass. Defaults to 32 (MTEB's ``batch_size`` wins).
            truncate_dim: a width the model declares. Defaults to None.
            **load_options: ``backend``, ``device`` and backend options for :meth:`Embedder.load`.
        """

        def __init__(self, path: str | Path, instructions: str | Path | dict | None = None, batch_size: int = 32,
                     truncate_dim: int | None = None, **load_options: Any) -> None:
            from nvembed_sdk.output import truncate

            self.embedder, self.spec = open_embedder(path, **load_options)
            self.instructions = read_instructions(instructions)
            self.batch_size = batch_size
            self.truncate_dim = truncate_dim
            dim = truncate(np.zeros((1, self.embedder.dim), np.float32), truncate_dim, self.spec).shape[1]
            self.mteb_model_meta = ModelMeta.create_empty({
                "name": f"nvembed-sdk/{Path(path).resolve().name}", "revision": self.embedder.precision,
                "embed_dim": dim, "max_tokens": self.embedder.text.max_length, "framework": ["PyTorch"],
                "similarity_fn_name": ScoringFunction.COSINE, "use_instructions": True, "modalities": ["text"],
            })

        def encode(self, inputs: Any, *, task_metadata: Any, hf_split: str, hf_subset: str,
                   prompt_type: Any = None, **kwargs: Any) -> np.ndarray:
            from nvembed_sdk.output import truncate

            texts = [t for batch in inputs for t in batch["text"]]
            side = getattr(prompt_type, "value", prompt_type)
            instruction = instruction_for(self.instructions, task_metadata.name, task_metadata.prompt, side)
            emb = self.embedder.embed(texts, instruction=instruction, batch_size=kwargs.get("batch_size") or self.batch_size,
                                      show_progress=bool(kwargs.get("show_progress_bar", False)))
            return truncate(emb, self.truncate_dim, self.spec)

    class LocalRetrievalTask(AbsTaskRetrieval):
        """A retrieval task over a local BEIR-layout folder (build with :func:`local_retrieval_task`)."""

        def __init__(self, beir: Any) -> None:
            self._beir = beir
            super().__init__()

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            if self.data_loaded:
                return
            b = self._beir
            split = RetrievalSplitData(
                corpus=Dataset.from_dict({"id": b.doc_ids, "text": b.docs}),
                queries=Dataset.from_dict({"id": b.query_ids, "text": b.queries}),
                relevant_docs={q: dict(d) for q, d in b.qrels.items()},
                top_ranked=None,
            )
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    def local_retrieval_task(directory: str | Path, name: str | None = None, max_queries: int | None = None,
                             max_corpus: int | None = None) -> Any:
        from nvembed_sdk.train.evaluate import load_beir

        d = Path(directory)
        beir = load_beir(d).subset(max_queries, max_corpus)
        prompt = {"query": beir.instruction, "document": ""} if beir.instruction else None
        metadata = TaskMetadata(
            name=name or f"LocalBEIR-{d.resolve().name}",
            description=f"Local BEIR-layout retrieval set read from {d}.",
            reference=None, dataset={"path": str(d.resolve()), "revision": "local"},
            type="Retrieval", category="t2t", modalities=["text"], eval_splits=["test"], eval_langs=["eng-Latn"],
            main_score="ndcg_at_10", date=None, domains=None, task_subtypes=None, license=None,
            annotations_creators=None, dialect=None, sample_creation=None, bibtex_citation=None, prompt=prompt,
        )
        # MTEB reads ``metadata`` from the class (unload_data drops an instance copy): one subclass per folder.
        task_cls = type("LocalRetrievalTask", (LocalRetrievalTask,), {"metadata": metadata, "__module__": __name__})
        return task_cls(beir)

    NVEmbedModel.__module__ = LocalRetrievalTask.__module__ = __name__
    _BUILT.update(NVEmbedModel=NVEmbedModel, LocalRetrievalTask=LocalRetrievalTask,
                  local_retrieval_task=local_retrieval_task)


def _built(name: str) -> Any:
    if not _BUILT:
        from nvembed_sdk._optional import require

        require("mteb")
        _build()
    return _BUILT[name]


def __getattr__(name: str) -> Any:
    if name in ("NVEmbedModel", "LocalRetrievalTask"):
        return _built(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def local_retrieval_task(directory: str | Path, name: str | None = None, max_queries: int | None = None,
                         max_corpus: int | None = None) -> Any:
    """An offline MTEB retrieval task over a local BEIR-layout folder.

    Args:
        directory: the folder (``corpus.jsonl(.gz)``, ``queries.jsonl(.gz)``, ``qrels.tsv`` or
            ``qrels/test.tsv``, optional ``instruction.txt``, which becomes the task's query prompt).
        name: task name (the key looked up in an instruction table). Defaults to ``LocalBEIR-<folder>``.
        max_queries: seeded query subset, as ``nvembed eval --max-queries``. Defaults to None (all).
        max_corpus: corpus subset (relevant documents kept). Defaults to None (all).

    Returns:
        An ``AbsTaskRetrieval`` with split ``test``.
    """
    return _built("local_retrieval_task")(directory, name, max_queries, max_corpus)


def evaluate_mteb(artifact: str | Path, beir_dir: str | Path, batch_size: int = 64, max_queries: int | None = None,
                  max_corpus: int | None = None, instructions: str | Path | dict | None = None,
                  show_progress: bool = False, **load_options: Any) -> dict[str, float]:
    """MTEB's own scores of an artifact on a local BEIR-layout set, run offline.

    Returns:
        ``{"ndcg@10", "recall@100", "mrr@10", "queries", "mteb": {all of MTEB's scores}}``.
    """
    if str(artifact) in ("bm25", "minilm"):
        raise InputError(fmt("--mteb", repr(str(artifact)), "an nvembed artifact (checkpoint, bundle, model.onnx, engine)"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs a hub; never reach for one
    import mteb

    task = local_retrieval_task(beir_dir, max_queries=max_queries, max_corpus=max_corpus)
    model = _built("NVEmbedModel")(artifact, instructions=instructions, batch_size=batch_size, **load_options)
    result = mteb.evaluate(model, task, cache=None, encode_kwargs={"batch_size": batch_size},
                           show_progress_bar=show_progress, co2_tracker=False)
    scores = result.task_results[0].scores["test"][0]
    nq = len(task._beir.qrels)
    return {"ndcg@10": float(scores["ndcg_at_10"]), "recall@100": float(scores["recall_at_100"]),
            "mrr@10": float(scores["mrr_at_10"]), "queries": nq,
            "mteb": {k: v for k, v in scores.items() if isinstance(v, (int, float))}}
