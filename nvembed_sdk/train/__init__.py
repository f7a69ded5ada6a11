"""Training core: two-stage contrastive instruction tuning for NV-Embed models.

Modules, one job each: ``config`` (TrainConfig per stage) and ``settings`` (its groups:
data sources, LoRA, eval, distill); ``readers`` (files -> examples, the held-out guard),
``data`` (blended, clash-free batches), ``batch`` (collation to tensors and group ids);
``startup`` (start weights: scratch, NV-Embed, Mistral; LoRA); ``losses`` (InfoNCE, the
distillation terms, the stage objective), ``gradcache`` (cached variant); ``teachers`` (BM25,
encoders), ``mining`` (TopK-PercPos hard negatives), ``distill`` (teacher targets, token
embeddings), ``bm25``; ``run_state`` (checkpoints, trainer state), ``dist`` (ranks), ``fsdp``;
``loop`` (the training loop); ``grow`` (wider / deeper checkpoints); ``evaluate`` (BEIR
metrics); ``cli`` (``nvembed train | mine | eval | tokenizer | grow``).

Nothing here is imported by ``import nvembed_sdk``.
"""

from __future__ import annotations
