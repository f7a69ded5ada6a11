"""The training loop: one stage of NV-Embed contrastive instruction tuning, top to bottom.

``train(cfg)`` reads like nanoGPT's ``train.py``: set up (device, ranks, seed), build the model
(fresh, NV-Embed checkpoint or Mistral causal LM; LoRA or full fine-tuning), the optimiser and
the schedule, resume if asked, then loop: batch -> embeddings -> InfoNCE -> backward ->
all-reduce -> clip -> step, with periodic logs, dev evaluations and atomic checkpoints. The end
writes ``final/`` with LoRA merged, in the released layout every other part of the SDK loads.

Data-parallel: launch with ``torchrun --nproc-per-node N $(which nvembed) train CONFIG``. Every
rank builds the same global batch and embeds its contiguous shard; embeddings are gathered
(the local shard keeps its graph) so in-batch negatives span the global batch, every rank
computes the same global loss, and summing the ranks' gradients gives exactly its gradient.
With ``"distributed": "fsdp"`` the same maths runs on a model sharded by
:mod:`nvembed_sdk.train.fsdp` (FSDP2); its hooks here are marked ``fsdp``.

The parts it calls, one job per module: ``startup`` (start weights, LoRA), ``run_state``
(checkpoints, trainer and RNG state, the output directory), ``dist`` (ranks), ``readers`` /
``data`` / ``batch`` (files -> examples -> blended batches -> tensors), ``losses`` (the stage
objective), ``distill`` / ``teachers`` (teacher targets), ``config`` / ``settings`` (the stage file).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nvembed_sdk.checkpoint import load_model
from nvembed_sdk.errors import ArtifactError, InputError, fmt
from nvembed_sdk.text import TextPipeline
from nvembed_sdk.train.batch import TrainBatch, collate, encode_side
from nvembed_sdk.train.config import TrainConfig
from nvembed_sdk.train.data import TrainData
from nvembed_sdk.train.dist import setup_dist
from nvembed_sdk.train.distill import batch_teacher_inputs, setup_distillation
from nvembed_sdk.train.gradcache import cached_backward
from nvembed_sdk.train.losses import StageLoss, embedding_distill_loss
from nvembed_sdk.train.readers import read_distill_texts
from nvembed_sdk.train.run_state import (
    CONFIG_FILE,
    RUN_FILE,
    STATE_FILE,
    check_finite_step,
    checkpoint_dirs,
    load_state,
    prepare_output_dir,
    rng_states,
    run_id_of,
    set_rng_states,
    write_model_dir,
)
from nvembed_sdk.train.startup import apply_lora, base_of, build_model, load_mistral


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at ``step``: linear warm-up, then linear/cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    decay = 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay



def train(cfg: TrainConfig, resume: bool = False, stop_after_steps: int | None = None,
          log: Any = print, overwrite: bool = False) -> dict[str, Any]:
    """Run one stage.

    Args:
        cfg: the stage config.
        resume: continue from the newest checkpoint in ``output_dir/checkpoints`` (weights,
            optimiser, scheduler, data position and RNG states). Defaults to False.
        stop_after_steps: stop (with a checkpoint, without ``final/``) once this many steps
            are done, as an interruption would. Defaults to None.
        log: callable taking one line. Defaults to print.
        overwrite: replace another run's checkpoints and ``final/`` in ``output_dir`` (without
            it, or ``resume``, such a directory is refused). Defaults to False.

    Returns:
        Summary: ``{"step", "final_dir", "history": [...], "evals": [...]}``.

    Raises:
        TrainingDiverged: a non-finite loss or gradient (the step is not applied, no checkpoint
            of it is written).
        InputError: ``output_dir`` holds another run (see ``overwrite``).
    """
    # -- setup
    dist_ = setup_dist()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if device.type == "cuda" and dist_.world > 1:
        device = torch.device("cuda", dist_.local_rank)
    out = Path(cfg.output_dir)
    prepare_output_dir(out, resume, overwrite, dist_.main)
    dist_.barrier()
    if dist_.main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(cfg.to_json(), encoding="utf-8")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    text = TextPipeline(cfg.tokenizer_dir, max_length=max(cfg.query_max_length, cfg.doc_max_length))
    data = TrainData(cfg.data, cfg.num_negatives, cfg.seed)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.bf16
                else contextlib.nullcontext())

    # -- model: start weights (or the last checkpoint's), then LoRA
    ckpts = checkpoint_dirs(out) if resume else []
    state = load_state(ckpts[-1]) if ckpts else None
    if state is not None and not cfg.lora.enabled:
        # Full fine-tuning: the checkpoint's fp32 weights are the exact training weights.
        model: nn.Module = load_model(ckpts[-1], dtype="float32", device=device)
        for p in model.parameters():
            p.requires_grad_(True)
        model.train()
    else:
        model = build_model(cfg, text.vocab_size, device)
        if cfg.lora.enabled:
            model = apply_lora(model, cfg)
    fsdp = None
    if cfg.distributed == "fsdp":  # shard before the optimiser sees the parameters
        from nvembed_sdk.train import fsdp

        fsdp.check_config(cfg, dist_.world)
        model = fsdp.shard(model)
    if state is not None and cfg.lora.enabled:
        missing = set(state["trainable"]) - {n for n, _ in model.named_parameters()}
        if missing:
            raise ArtifactError(fmt("resume", f"unknown trainable keys {sorted(missing)[:3]}", "the same LoRA settings"))
        named = dict(model.named_parameters())
        with torch.no_grad():
            for n, v in state["trainable"].items():
                named[n].copy_(v)
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    n_all = sum(p.numel() for p in model.parameters())

    # -- optimiser: decay on matrices only (norms, biases, latents' scale-free rows excluded)
    named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named_params if p.dim() >= 2 and "latents" not in n]
    no_decay = [p for n, p in named_params if not (p.dim() >= 2 and "latents" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas,
                            fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    step, epoch, batch_in_epoch = 0, 0, 0
    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    run_id = str((state or {}).get("run_id") or (run_id_of(ckpts[-1]) if ckpts else None) or uuid.uuid4().hex)
    last_good: list[Path] = list(ckpts[-1:])
    if state is not None:
        if fsdp is None:
            opt.load_state_dict(state["optimizer"])
        else:
            fsdp.load_optimizer(model, opt, state["optimizer"])  # full state in, this rank's shard kept
        sched.load_state_dict(state["scheduler"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        history, evals = state.get("history", []), state.get("evals", [])
        set_rng_states(state["rng"])
        if dist_.main:
            log(f"resumed from {ckpts[-1]} at step {step} (epoch {epoch}, batch {batch_in_epoch})")
    if dist_.main:
        log(f"model: {n_all:,} parameters, {n_train:,} trainable ({'LoRA' if cfg.lora.enabled else 'full'}); "
            f"device {device}, world {dist_.world}; tokenizer {text.vocab_size} tokens")

    # -- embedding distillation: teacher targets for every training text, cached on disk
    ds = cfg.distill
    distill = None
    extra_texts = read_distill_texts(ds.texts)
    if ds.teacher and (ds.embedding_weight > 0 or ds.relation_weight > 0 or ds.init_token_embeddings):
        distill = setup_distillation(cfg, data, text, base_of(model), fresh=state is None, log=log, dist_=dist_,
                                     extra_texts=extra_texts)
    if extra_texts and dist_.main:
        log(f"distillation-only texts: {len(extra_texts):,}, {ds.texts_per_step} per step")
    objective = StageLoss(temperature=cfg.temperature, in_batch_negatives=cfg.in_batch_negatives,
                          score_weight=ds.score_weight, score_temperature=ds.score_temperature,
                          embedding_weight=ds.embedding_weight if distill is not None else 0.0,
                          relation_weight=ds.relation_weight if distill is not None else 0.0,
                          relation_temperature=ds.relation_temperature)

    def embed(enc) -> torch.Tensor:
        with autocast:
            return model(enc.input_ids, enc.attention_mask, enc.pool_mask)  # (n, D) fp32, normalised

    def loss_fn(batch: TrainBatch):
        def fn(q_local: torch.Tensor, d_local: torch.Tensor) -> torch.Tensor:
            q, d = dist_.gather(q_local), dist_.gather(d_local)  # (B, D), (B * (1 + K), D)
            if distill is None:
                return objective(q, d, batch)
            return objective(q, d, batch, *batch_teacher_inputs(*distill, batch.extras, objective))
        return fn

    def save_checkpoint() -> None:
        full, full_opt = fsdp.gather(model, opt) if fsdp is not None else (None, None)  # every rank takes part
        if not dist_.main:
            return
        trainable = ({n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
                     if cfg.lora.enabled else {})
        optim_state = full_opt if fsdp is not None else opt.state_dict()
        extra = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "optimizer": optim_state,
                 "scheduler": sched.state_dict(), "rng": rng_states(), "trainable": trainable,
                 "history": history, "evals": evals, "train_config": cfg.to_dict(), "run_id": run_id}
        if not all(bool(torch.isfinite(p).all()) for p in (full.parameters() if full is not None else params)):
            check_finite_step(step, float("nan"), float("nan"), last_good[-1] if last_good else None)
        write_model_dir(full or model, out / "checkpoints" / f"step-{step:06d}", text, cfg, dtype="float32",
                        extra=extra, run_id=run_id)
        last_good[:] = [out / "checkpoints" / f"step-{step:06d}"]
        ours = [c for c in checkpoint_dirs(out) if run_id_of(c) == run_id]
        for old in ours[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def run_eval() -> dict[str, Any] | None:
        if not (cfg.eval.beir_dir and dist_.main):
            return None
        from nvembed_sdk.embedder import Embedder
        from nvembed_sdk.runtimes.pt import TorchBackend
        from nvembed_sdk.train.evaluate import evaluate_embedder, load_beir

        # A fixed subset seed: every stage and run is scored on the same queries and documents.
        beir = load_beir(cfg.eval.beir_dir).subset(cfg.eval.max_queries, cfg.eval.max_corpus, seed=0)
        backend = TorchBackend(text.directory, device=str(device), model=base_of(model),
                               precision="fp32").load()
        t0 = time.time()
        metrics = evaluate_embedder(Embedder(backend, text), beir, batch_size=cfg.eval.batch_size,
                                    doc_max_length=cfg.doc_max_length)
        model.train()
        rec = {"step": step, **{k: round(v, 4) for k, v in metrics.items()}, "seconds": round(time.time() - t0, 1)}
        evals.append(rec)
        with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"eval": rec}) + "\n")
        log(f"eval step {step}: nDCG@10 {metrics['ndcg@10']:.4f}  Recall@100 {metrics['recall@100']:.4f}  "
            f"MRR@10 {metrics['mrr@10']:.4f}  ({rec['seconds']}s, {metrics['queries']} queries)")
        return rec

    if step == 0 and not evals:
        run_eval()

    # -- loop
    t_start = time.time()
    t_ckpt = time.time()
    micro = cfg.batch_size // cfg.grad_accum_steps
    examples, batches = data.epoch_batches(epoch, cfg.batch_size)
    if not batches:
        raise InputError(fmt("training data", f"{len(examples)} examples", f"enough for one batch of {cfg.batch_size}"))
    t_log, loss_acc, n_acc = time.time(), 0.0, 0
    while step < cfg.max_steps:
        if batch_in_epoch >= len(batches):
            epoch, batch_in_epoch = epoch + 1, 0
            examples, batches = data.epoch_batches(epoch, cfg.batch_size)
        batch_examples = [examples[i] for i in batches[batch_in_epoch]]
        # Same draw on every rank and after a resume: the negatives' RNG is keyed by position.
        rng = np.random.default_rng([cfg.seed, epoch, batch_in_epoch])
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for m in range(cfg.grad_accum_steps):
            part = batch_examples[m * micro : (m + 1) * micro]
            batch = collate(part, data, text, rng, query_max_length=cfg.query_max_length,
                            doc_max_length=cfg.doc_max_length, rank=dist_.rank, world=dist_.world)
            queries, docs = batch.queries.to(device), batch.docs.to(device)
            fn = loss_fn(batch)
            if cfg.gradcache_chunk:
                loss = cached_backward(embed, [queries, docs], fn, chunk_size=cfg.gradcache_chunk,
                                      scale=1.0 / cfg.grad_accum_steps)
            else:
                loss = fn(embed(queries), embed(docs))
                (loss / cfg.grad_accum_steps).backward()
            step_loss += float(loss.detach()) / cfg.grad_accum_steps
        if extra_texts and distill is not None:
            # Distillation-only texts: this rank's share of a draw keyed by position (resumable).
            n_local = max(1, ds.texts_per_step // dist_.world)
            pick = np.random.default_rng([cfg.seed, epoch, batch_in_epoch, 7, dist_.rank]).choice(
                len(extra_texts), size=min(n_local, len(extra_texts)), replace=False)
            chosen = [extra_texts[i] for i in pick]
            enc = encode_side(text, chosen, [""] * len(chosen), max_length=cfg.doc_max_length).to(device)
            cache, proj = distill
            tx, fx = cache.targets(chosen, proj)  # (n, D), (n,)
            extra_loss = ds.embedding_weight * embedding_distill_loss(embed(enc), tx, fx)
            extra_loss.backward()
            step_loss += float(extra_loss.detach())
        if fsdp is None:
            dist_.sum_grads(params)  # FSDP has reduce-scattered them (summed) during backward
        clip = fsdp.clip_grad_norm if fsdp is not None else torch.nn.utils.clip_grad_norm_
        grad_norm = float(clip(params, cfg.grad_clip)) if cfg.grad_clip > 0 else 0.0
        check_finite_step(step + 1, step_loss, grad_norm, last_good[-1] if last_good else None)
        opt.step()
        sched.step()
        step += 1
        batch_in_epoch += 1
        loss_acc, n_acc = loss_acc + step_loss, n_acc + 1
        if dist_.main and (step % cfg.log_every_steps == 0 or step == cfg.max_steps):
            dt = time.time() - t_log
            rec = {"step": step, "loss": round(loss_acc / n_acc, 5), "lr": sched.get_last_lr()[0],
                   "grad_norm": round(grad_norm, 4), "epoch": epoch, "sec_per_step": round(dt / n_acc, 3)}
            history.append(rec)
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")
            log(f"step {step}/{cfg.max_steps}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  "
                f"|g| {grad_norm:.2f}  {rec['sec_per_step']:.2f}s/step  epoch {epoch}")
            t_log, loss_acc, n_acc = time.time(), 0.0, 0
        if cfg.eval.beir_dir and step % cfg.eval.every_steps == 0 and step < cfg.max_steps:
            run_eval()
        out_of_time = cfg.max_minutes is not None and (time.time() - t_start) / 60 >= cfg.max_minutes
        stopping = stop_after_steps is not None and step >= stop_after_steps
        due = step % cfg.checkpoint_every_steps == 0 or (
            cfg.checkpoint_every_minutes is not None and (time.time() - t_ckpt) / 60 >= cfg.checkpoint_every_minutes)
        if (due or out_of_time or stopping) and step < cfg.max_steps:
            save_checkpoint()
            t_ckpt = time.time()
        if out_of_time or stopping:
            if dist_.main:
                log(f"stopped at step {step} ({'time limit' if out_of_time else 'stop_after_steps'}); "
                    "continue with --resume")
            return {"step": step, "final_dir": None, "history": history, "evals": evals}

    # -- end: last eval, last checkpoint, merged final model
    run_eval()
    save_checkpoint()
    final = out / "final"
    full = fsdp.gather(model)[0] if fsdp is not None else None
    if dist_.main:
        write_model_dir(full or model, final, text, cfg, dtype=cfg.save_dtype)
        (final / "training_summary.json").write_text(json.dumps({"history": history, "evals": evals}, indent=1),
                                                     encoding="utf-8")
        log(f"done: {step} steps; final model{' (LoRA merged)' if cfg.lora.enabled else ''} in {final}")
    return {"step": step, "final_dir": str(final), "history": history, "evals": evals}


__all__ = ["CONFIG_FILE", "RUN_FILE", "STATE_FILE", "apply_lora", "build_model", "checkpoint_dirs", "load_mistral",
           "lr_factor", "run_id_of", "train"]
