"""Training core: two-stage contrastive instruction tuning for NV-Embed models.

Modules: ``config`` (TrainConfig per stage), ``data`` (readers, example-based pair builder,
blended batches), ``losses`` (InfoNCE), ``gradcache`` (cached variant), ``mining``
(TopK-PercPos hard negatives), ``bm25`` (teacher and baseline), ``loop`` (the training loop),
``evaluate`` (BEIR metrics), ``cli`` (``nvembed train | mine | eval | tokenizer``).

Nothing here is imported by ``import nvembed_sdk``.
"""

from __future__ import annotations
