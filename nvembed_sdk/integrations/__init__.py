"""Adapters over :class:`nvembed_sdk.Embedder` for sentence-transformers, LangChain, LlamaIndex and MTEB.

Each lives in its own module and imports its framework only when one of its classes is first
used, so ``import nvembed_sdk`` (and this package) needs none of them:

* ``nvembed_sdk.integrations.sentence_transformers`` (extra ``st``): ``NVEmbedModule``, ``NVEmbedSentenceTransformer``
* ``nvembed_sdk.integrations.langchain`` (extra ``langchain``): ``NVEmbedEmbeddings``
* ``nvembed_sdk.integrations.llamaindex`` (extra ``llamaindex``): ``NVEmbedEmbedding``
* ``nvembed_sdk.integrations.mteb`` (extra ``mteb``): ``NVEmbedModel``, ``local_retrieval_task``, ``evaluate_mteb``

``pip install -e '.[integrations]'`` in the checkout installs all four.
"""
