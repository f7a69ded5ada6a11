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
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nvembed_sdk.checkpoint import _set_param, load_model, save_model, save_torch, to_ours
from nvembed_sdk.config import PRESETS, DecoderConfig, LatentAttentionConfig, NVEmbedConfig
from nvembed_sdk.errors import ArtifactError, InputError, TrainingDiverged, fmt, writing
from nvembed_sdk.model import NVEmbedModel
from nvembed_sdk.text import TextPipeline
from nvembed_sdk.train.config import TrainConfig
from nvembed_sdk.train.data import TrainBatch, TrainData, collate, encode_side, read_distill_texts
from nvembed_sdk.train.distill import (
    TeacherCache,
    embedding_distill_loss,
    init_token_embeddings,
    teacher_encoder,
    token_texts,
)
from nvembed_sdk.train.gradcache import cached_backward
from nvembed_sdk.train.losses import compute_loss_from_embeddings

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "train_config.json"
RUN_FILE = "run.json"  # {"run_id": ...} in each step checkpoint: pruning only touches its own run's


# ---- model construction ------------------------------------------------------------------------


def scratch_config(model: dict[str, Any], vocab_size: int, max_length: int | None = None) -> NVEmbedConfig:
    """An :class:`NVEmbedConfig` from ``{"preset", **DecoderConfig fields, "latent": {...}}``.

    The latent head's ``latent_dim``/``hidden_dim`` follow the decoder width (the released
    architecture requires them equal); ``vocab_size`` comes from the tokenizer.
    """
    spec = dict(model)
    preset = spec.pop("preset", "tiny-test")
    if preset not in PRESETS:
        raise InputError(fmt("model.preset", repr(preset), f"one of {sorted(PRESETS)}"))
    base = PRESETS[preset]
    latent_over = dict(spec.pop("latent", {}))
    max_len = int(spec.pop("max_length", max_length or base.max_length))
    text_kwargs = {**base.text.__dict__, "head_dim": None, **spec, "vocab_size": vocab_size}
    try:
        text = DecoderConfig(**text_kwargs)
        h = text.hidden_size
        latent = LatentAttentionConfig(**{**base.latent.__dict__, **latent_over, "latent_dim": h, "hidden_dim": h})
    except TypeError as exc:
        raise InputError(fmt("train config model", str(exc), "DecoderConfig fields and a 'latent' dict")) from exc
    return NVEmbedConfig(text=text, latent=latent, max_length=max_len, torch_dtype="float32")


def load_mistral(path: str | Path, latent: dict[str, Any] | None = None, device: str | torch.device = "cpu",
                 seed: int = 0) -> NVEmbedModel:
    """A Mistral causal-LM checkpoint as the decoder, with a freshly initialised latent head.

    ``model.*`` keys map to the decoder (through the released key table), ``lm_head.weight`` is
    dropped, anything else is an error.

    Raises:
        ArtifactError: missing files or unknown keys.
    """
    from nvembed_sdk.checkpoint import _iter_tensors, safetensors_files

    p = Path(path)
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ArtifactError(fmt("mistral init", f"no config.json in {p}", "a Mistral causal-LM checkpoint"))
    hf = json.loads(cfg_file.read_text(encoding="utf-8"))
    fields = set(DecoderConfig.__dataclass_fields__)
    text = DecoderConfig(**{k: v for k, v in hf.items() if k in fields and v is not None})
    h = text.hidden_size
    la = LatentAttentionConfig(**{**(latent or {}), "latent_dim": h, "hidden_dim": h})
    cfg = NVEmbedConfig(text=text, latent=la, torch_dtype="float32")
    with torch.device("meta"):
        model = NVEmbedModel(cfg)
    # The head is fresh: materialise and initialise it on its own (the decoder stays on meta
    # until its tensors arrive, so a 7B model is never held twice).
    model.head = fresh_head(cfg, seed).to(device)
    expected = {n: t.shape for n, t in model.decoder.named_parameters(prefix="decoder")}
    seen = set()
    for key, tensor in _iter_tensors(safetensors_files(p)):
        if key == "lm_head.weight":
            continue
        if not key.startswith("model."):
            raise ArtifactError(fmt("mistral checkpoint key", repr(key), "'model.*' or 'lm_head.weight'"))
        ours = to_ours("embedding_model." + key[len("model."):])
        if ours not in expected or tensor.shape != expected[ours]:
            raise ArtifactError(fmt(f"mistral checkpoint key {key!r}", f"shape {tuple(tensor.shape)}",
                                    f"a decoder weight matching config.json ({ours})"))
        _set_param(model, ours, tensor.to(device=device, dtype=torch.float32))
        seen.add(ours)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ArtifactError(fmt("mistral checkpoint", f"missing {missing[:3]}", "every decoder weight"))
    model.reset_buffers(device)
    for prm in model.parameters():
        prm.requires_grad_(True)
    return model


def fresh_head(cfg: NVEmbedConfig, seed: int = 0) -> nn.Module:
    """A newly initialised latent-attention head, by the rule of ``NVEmbedModel.init_weights``:
    N(0, initializer_range) linears, unit LayerNorms, N(0, 1) latents."""
    from nvembed_sdk.model import LatentAttention

    head = LatentAttention(cfg.latent)
    gen = torch.Generator().manual_seed(seed)
    std = cfg.text.initializer_range
    with torch.no_grad():
        for mod in head.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * std)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, nn.LayerNorm):
                mod.weight.fill_(1.0)
                mod.bias.zero_()
        head.latents.copy_(torch.randn(head.latents.shape, generator=gen))
    return head


def build_model(cfg: TrainConfig, vocab_size: int, device: torch.device) -> NVEmbedModel:
    """The stage's starting weights, trainable, in fp32."""
    if cfg.init == "scratch":
        if cfg.init_path:
            raise InputError(fmt("init_path", cfg.init_path, "init 'scratch' takes no init_path (use init 'nvembed')"))
        model = NVEmbedModel(scratch_config(cfg.model, vocab_size, cfg.max_length)).init_weights(seed=cfg.seed)
    elif cfg.init == "nvembed":
        model = load_model(cfg.init_path, dtype="float32", device="cpu")  # type: ignore[arg-type]
    else:
        model = load_mistral(cfg.init_path, cfg.model.get("latent"), seed=cfg.seed)  # type: ignore[arg-type]
    if model.cfg.text.vocab_size != vocab_size:
        raise ArtifactError(fmt("tokenizer", f"{vocab_size} tokens", f"the model's vocab_size {model.cfg.text.vocab_size}"))
    if cfg.max_length:
        model.cfg = model.cfg.replace(max_length=cfg.max_length)
    for p in model.parameters():
        p.requires_grad_(True)
    return model.to(device).train()


def apply_lora(model: NVEmbedModel, cfg: TrainConfig) -> nn.Module:
    """Wrap the decoder's projections with LoRA (peft); the latent head stays fully trainable."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        from nvembed_sdk.errors import BackendUnavailableError

        raise BackendUnavailableError(fmt("LoRA", "peft is not installed", "pip install -e '.[train]' from the nvembed-sdk checkout")) from exc
    names = "|".join(cfg.lora.target_modules)
    lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=rf"decoder\.layers\.\d+\.(attn|mlp)\.({names})")
    peft_model = get_peft_model(model, lcfg)
    for p in peft_model.get_base_model().head.parameters():
        p.requires_grad_(True)  # NV-Embed trains the latent head fully, at the same lr
    return peft_model


def base_of(model: nn.Module) -> NVEmbedModel:
    """The NVEmbedModel inside (itself, or the one peft wraps)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[return-value]


class _MergedView:
    """What ``save_model`` needs (``cfg``, ``named_parameters``, ``parameters``) with LoRA deltas
    added to the base weights, computed without touching the live model."""

    def __init__(self, model: nn.Module) -> None:
        base = base_of(model)
        self.cfg = base.cfg
        merged: dict[str, torch.Tensor] = {}
        for name, p in base.named_parameters():
            if "lora_" not in name:
                merged[name.replace(".base_layer", "")] = p.detach()
        for name, mod in base.named_modules():
            if hasattr(mod, "get_delta_weight") and hasattr(mod, "base_layer"):
                w = mod.base_layer.weight.detach()
                merged[name + ".weight"] = w + mod.get_delta_weight("default").to(w.dtype)
        self._params = merged

    def named_parameters(self):
        return iter(self._params.items())

    def parameters(self):
        return iter(self._params.values())


# ---- schedule, checkpoints ---------------------------------------------------------------------


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at ``step``: linear warm-up, then linear/cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    decay = 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file()),
                  key=lambda p: int(p.name.split("-")[1]))


def write_model_dir(model: nn.Module, out: Path, text: TextPipeline, cfg: TrainConfig,
                    dtype: str = "float32", extra: dict[str, Any] | None = None, run_id: str | None = None) -> None:
    """Released layout + tokenizer + the stage config, written to a temp dir then renamed."""
    tmp = out.with_name(f".tmp-{out.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    view = _MergedView(model) if hasattr(model, "get_base_model") else model
    with writing(out, "checkpoint"):  # a full or read-only disk: one line, no half-written temp dir
        try:
            save_model(view, tmp, dtype=dtype)  # type: ignore[arg-type]
            text.save(tmp)
            (tmp / CONFIG_FILE).write_text(cfg.to_json(), encoding="utf-8")
            if extra is not None:
                save_torch(extra, tmp / STATE_FILE)  # a full disk: OSError, not torch's RuntimeError
            if run_id is not None:
                (tmp / RUN_FILE).write_text(json.dumps({"run_id": run_id}) + "\n", encoding="utf-8")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if out.exists():
        old = out.with_name(f".old-{out.name}")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def run_id_of(checkpoint: Path) -> str | None:
    """The run a step checkpoint belongs to (None: written before run ids, or unreadable)."""
    try:
        return str(json.loads((checkpoint / RUN_FILE).read_text(encoding="utf-8"))["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare_output_dir(out: Path, resume: bool, overwrite: bool, main: bool = True) -> None:
    """Refuse to start a new run over another run's checkpoints or final model.

    A fresh run in a finished run's directory used to have its new checkpoints pruned as older
    than the old run's, and a later ``--resume`` continued the old run.

    Raises:
        InputError: ``out`` holds checkpoints or ``final/`` and neither ``resume`` nor ``overwrite``.
    """
    if resume and overwrite:
        raise InputError(fmt("--resume and --overwrite", "both", "one of them: continue the run, or replace it"))
    if resume:
        return
    old = [p for p in (out / "checkpoints").glob("step-*")] if (out / "checkpoints").is_dir() else []
    final = out / "final"
    if not old and not final.exists():
        return
    if not overwrite:
        what = f"{len(old)} checkpoints" + (" and final/" if final.exists() else "")
        raise InputError(fmt(f"output_dir {out}", f"another run's {what}",
                             "--resume to continue that run, --overwrite to replace it, or another --output-dir"))
    if main:
        for p in [out / "checkpoints", final]:
            if p.exists():
                shutil.rmtree(p)
        (out / "metrics.jsonl").unlink(missing_ok=True)


def load_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.pt``; a truncated or corrupt file is an ArtifactError naming it."""
    path = checkpoint / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError... on a bad file
        raise ArtifactError(fmt(str(path), f"unreadable ({type(exc).__name__}: {str(exc)[:120]})",
                                f"a complete checkpoint; move {checkpoint.name} aside to resume from the one before, "
                                "or start again with --overwrite")) from None
    if not isinstance(state, dict) or "step" not in state or "optimizer" not in state:
        raise ArtifactError(fmt(str(path), "not a trainer state", "a checkpoint written by nvembed train"))
    return state


def check_finite_step(step: int, loss: float, grad_norm: float, last: Path | None) -> None:
    """Stop a diverged run before the optimiser applies its step (and before any checkpoint of it)."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    kept = f"the last good checkpoint {last} is kept" if last else "no checkpoint was written"
    raise TrainingDiverged(fmt(f"training step {step}", f"loss {loss}, gradient norm {grad_norm}",
                               f"lower lr, check the data and start weights; {kept} (weights unchanged)"))


def _rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_states(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ---- distributed helpers -----------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' (n, D) rows, rank-major; the local rows keep their graph (the others are
        constants here: their own rank differentiates them)."""
        if self.world == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.detach().contiguous())
        parts[self.rank] = x
        return torch.cat(parts)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def sum_grads(self, params: list[torch.Tensor]) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def setup_dist() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# ---- distillation setup ------------------------------------------------------------------------


def _setup_distillation(cfg: TrainConfig, data: TrainData, text: TextPipeline, model: NVEmbedModel, fresh: bool,
                        log: Any, dist_: Dist, extra_texts: list[str]) -> tuple[TeacherCache, np.ndarray]:
    """Fill the teacher cache (vocabulary pieces, the queries and positives of the pair
    sources: the texts every epoch sees, and the distillation-only texts; negatives and section
    texts get targets when already cached), fix the projection, and on a fresh scratch start
    write the teacher's piece embeddings into the input embeddings."""
    cache = TeacherCache(cfg.teacher_cache_dir)
    pieces = token_texts(Path(text.directory) / "tokenizer.json") if cfg.init_token_embeddings else []
    texts = [p for p in pieces if p] + data.pair_texts() + extra_texts
    if dist_.main:  # rank 0 fills the cache and fixes the projection; the others then read both
        missing = sum(1 for t in dict.fromkeys(texts) if t not in cache)
        if missing:
            log(f"teacher {cfg.teacher}: embedding {missing:,} texts into {cfg.teacher_cache_dir}")
            cache.fill(texts, teacher_encoder(cfg.teacher, max_length=cfg.teacher_max_length,
                                              num_threads=cfg.num_threads))
        cache.projection(model.cfg.text.hidden_size)
    dist_.barrier()
    if not dist_.main:
        cache = TeacherCache(cfg.teacher_cache_dir)
    proj = cache.projection(model.cfg.text.hidden_size)
    if cfg.init_token_embeddings and fresh:
        n = init_token_embeddings(model.decoder.embed_tokens.weight, pieces, cache, proj)
        if dist_.main:
            log(f"input embeddings: {n:,} of {len(pieces):,} rows from the teacher's piece embeddings")
    return cache, proj


# ---- the loop ----------------------------------------------------------------------------------


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
        _set_rng_states(state["rng"])
        if dist_.main:
            log(f"resumed from {ckpts[-1]} at step {step} (epoch {epoch}, batch {batch_in_epoch})")
    if dist_.main:
        log(f"model: {n_all:,} parameters, {n_train:,} trainable ({'LoRA' if cfg.lora.enabled else 'full'}); "
            f"device {device}, world {dist_.world}; tokenizer {text.vocab_size} tokens")

    # -- embedding distillation: teacher targets for every training text, cached on disk
    distill = None
    extra_texts = read_distill_texts(cfg.distill_texts)
    if cfg.teacher and (cfg.embed_distill_weight > 0 or cfg.init_token_embeddings):
        distill = _setup_distillation(cfg, data, text, base_of(model), fresh=state is None, log=log, dist_=dist_,
                                      extra_texts=extra_texts)
    if extra_texts and dist_.main:
        log(f"distillation-only texts: {len(extra_texts):,}, {cfg.distill_batch_size} per step")

    def embed(enc) -> torch.Tensor:
        with autocast:
            return model(enc.input_ids, enc.attention_mask, enc.pool_mask)  # (n, D) fp32, normalised

    def loss_fn(batch: TrainBatch):
        def fn(q_local: torch.Tensor, d_local: torch.Tensor) -> torch.Tensor:
            q, d = dist_.gather(q_local), dist_.gather(d_local)  # (B, D), (B * (1 + K), D)
            loss = compute_loss_from_embeddings(
                q, d, batch.num_negatives, cfg.temperature, cfg.in_batch_negatives, batch.query_groups,
                batch.doc_groups, 0, batch.teacher_scores, cfg.distill_weight, cfg.distill_temperature)
            if distill is not None and cfg.embed_distill_weight > 0:
                cache, proj = distill
                tq, fq = cache.targets(batch.extras["query_texts"], proj)  # (B, D), (B,)
                td, fd = cache.targets(batch.extras["doc_texts"], proj)  # (B * (1 + K), D)
                loss = loss + cfg.embed_distill_weight * embedding_distill_loss(
                    torch.cat([q, d]), torch.cat([tq, td]), torch.cat([fq, fd]))
            return loss
        return fn

    def save_checkpoint() -> None:
        full, full_opt = fsdp.gather(model, opt) if fsdp is not None else (None, None)  # every rank takes part
        if not dist_.main:
            return
        trainable = ({n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
                     if cfg.lora.enabled else {})
        optim_state = full_opt if fsdp is not None else opt.state_dict()
        extra = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "optimizer": optim_state,
                 "scheduler": sched.state_dict(), "rng": _rng_states(), "trainable": trainable,
                 "history": history, "evals": evals, "train_config": cfg.to_dict(), "run_id": run_id}
        if not all(bool(torch.isfinite(p).all()) for p in (full.parameters() if full is not None else params)):
            check_finite_step(step, float("nan"), float("nan"), last_good[-1] if last_good else None)
        write_model_dir(full or model, out / "checkpoints" / f"step-{step:06d}", text, cfg, "float32", extra, run_id)
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
            batch = collate(part, data, text, rng, cfg.query_max_length, cfg.doc_max_length, dist_.rank, dist_.world)
            queries, docs = batch.queries.to(device), batch.docs.to(device)
            fn = loss_fn(batch)
            if cfg.gradcache_chunk:
                loss = cached_backward(embed, [queries, docs], fn, cfg.gradcache_chunk, 1.0 / cfg.grad_accum_steps)
            else:
                loss = fn(embed(queries), embed(docs))
                (loss / cfg.grad_accum_steps).backward()
            step_loss += float(loss.detach()) / cfg.grad_accum_steps
        if extra_texts and distill is not None:
            # Distillation-only texts: this rank's share of a draw keyed by position (resumable).
            n_local = max(1, cfg.distill_batch_size // dist_.world)
            pick = np.random.default_rng([cfg.seed, epoch, batch_in_epoch, 7, dist_.rank]).choice(
                len(extra_texts), size=min(n_local, len(extra_texts)), replace=False)
            chosen = [extra_texts[i] for i in pick]
            enc = encode_side(text, chosen, [""] * len(chosen), cfg.doc_max_length).to(device)
            cache, proj = distill
            tx, fx = cache.targets(chosen, proj)  # (n, D), (n,)
            extra_loss = cfg.embed_distill_weight * embedding_distill_loss(embed(enc), tx, fx)
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
        write_model_dir(full or model, final, text, cfg, cfg.save_dtype)
        (final / "training_summary.json").write_text(json.dumps({"history": history, "evals": evals}, indent=1),
                                                     encoding="utf-8")
        log(f"done: {step} steps; final model{' (LoRA merged)' if cfg.lora.enabled else ''} in {final}")
    return {"step": step, "final_dir": str(final), "history": history, "evals": evals}


def merged_model(model: nn.Module) -> NVEmbedModel:
    """A plain NVEmbedModel with any LoRA merged into the decoder weights (peft ``merge_and_unload``)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()  # type: ignore[no-any-return]
    return model  # type: ignore[return-value]


__all__ = ["apply_lora", "build_model", "fresh_head", "load_mistral", "lr_factor", "merged_model", "scratch_config",
           "train"]
