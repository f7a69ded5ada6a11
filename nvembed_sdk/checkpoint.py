"""Checkpoint I/O in the released NV-Embed-v2 layout, through an explicit key table.

Released key (safetensors) -> our module path. ``{}`` is the layer index. Every key of a
checkpoint must be consumed and every parameter of the model must be filled; any leftover,
missing or mis-shaped key raises :class:`ArtifactError` naming the key.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from nvembed_sdk.config import NVEmbedConfig
from nvembed_sdk.errors import ArtifactError, fmt
from nvembed_sdk.model import NVEmbedModel

_E = "embedding_model."
_L = "latent_attention_model."

# released name -> ours (None = drop: a buffer that is not a weight).
FROM_RELEASED: dict[str, str | None] = {
    _E + "embed_tokens.weight": "decoder.embed_tokens.weight",
    _E + "layers.{}.input_layernorm.weight": "decoder.layers.{}.attn_norm.weight",
    _E + "layers.{}.self_attn.q_proj.weight": "decoder.layers.{}.attn.q_proj.weight",
    _E + "layers.{}.self_attn.k_proj.weight": "decoder.layers.{}.attn.k_proj.weight",
    _E + "layers.{}.self_attn.v_proj.weight": "decoder.layers.{}.attn.v_proj.weight",
    _E + "layers.{}.self_attn.o_proj.weight": "decoder.layers.{}.attn.o_proj.weight",
    _E + "layers.{}.post_attention_layernorm.weight": "decoder.layers.{}.mlp_norm.weight",
    _E + "layers.{}.mlp.gate_proj.weight": "decoder.layers.{}.mlp.gate_proj.weight",
    _E + "layers.{}.mlp.up_proj.weight": "decoder.layers.{}.mlp.up_proj.weight",
    _E + "layers.{}.mlp.down_proj.weight": "decoder.layers.{}.mlp.down_proj.weight",
    _E + "norm.weight": "decoder.norm.weight",
    # Rotary frequencies are recomputed from the config; some transformers versions saved them.
    _E + "layers.{}.self_attn.rotary_emb.inv_freq": None,
    _E + "rotary_emb.inv_freq": None,
    _L + "latents": "head.latents",
    _L + "cross_attend_blocks.0.norm.weight": "head.norm_q.weight",
    _L + "cross_attend_blocks.0.norm.bias": "head.norm_q.bias",
    _L + "cross_attend_blocks.0.norm_context.weight": "head.norm_kv.weight",
    _L + "cross_attend_blocks.0.norm_context.bias": "head.norm_kv.bias",
    _L + "cross_attend_blocks.0.fn.to_q.weight": "head.to_q.weight",
    _L + "cross_attend_blocks.0.fn.to_kv.weight": "head.to_kv.weight",
    _L + "cross_attend_blocks.0.fn.to_out.weight": "head.to_out.weight",
    _L + "cross_attend_blocks.1.norm.weight": "head.norm_ff.weight",
    _L + "cross_attend_blocks.1.norm.bias": "head.norm_ff.bias",
    _L + "cross_attend_blocks.1.fn.net.0.weight": "head.ff_in.weight",
    _L + "cross_attend_blocks.1.fn.net.0.bias": "head.ff_in.bias",
    _L + "cross_attend_blocks.1.fn.net.2.weight": "head.ff_out.weight",
    _L + "cross_attend_blocks.1.fn.net.2.bias": "head.ff_out.bias",
}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

_PATTERNS = [(re.compile("^" + re.escape(k).replace(r"\{\}", r"(\d+)") + "$"), v) for k, v in FROM_RELEASED.items()]
_TO_RELEASED = [(re.compile("^" + re.escape(v).replace(r"\{\}", r"(\d+)") + "$"), k)
                for k, v in FROM_RELEASED.items() if v is not None]


def to_ours(key: str) -> str | None:
    """Released key -> our parameter name; raises for a key the table does not know."""
    for pattern, ours in _PATTERNS:
        m = pattern.match(key)
        if m:
            return None if ours is None else ours.replace("{}", m.group(1)) if m.groups() else ours
    raise ArtifactError(fmt("checkpoint key", repr(key), "an NV-Embed-v2 key (unexpected key)"))


def to_released(name: str) -> str:
    for pattern, released in _TO_RELEASED:
        m = pattern.match(name)
        if m:
            return released.replace("{}", m.group(1)) if m.groups() else released
    raise ArtifactError(fmt("parameter", repr(name), "a parameter of NVEmbedModel"))


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise ArtifactError(fmt("dtype", repr(name), f"one of {sorted(_DTYPES)}")) from None


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint: the shards of the index, or ``model.safetensors``."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ArtifactError(fmt(str(index), f"unreadable index ({exc})", "a safetensors index with weight_map")) from exc
        files = sorted({directory / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ArtifactError(fmt(str(directory), f"missing shards {missing}", "every shard named by the index"))
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise ArtifactError(
        fmt(str(directory), "no model.safetensors or model.safetensors.index.json",
            "a checkpoint directory with safetensors weights (use `nvembed info` for config-only dirs)")
    )


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as reader:
                for key in reader.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield key, reader.get_tensor(key)
        except SafetensorError as exc:
            raise ArtifactError(fmt(str(f), f"corrupt safetensors file ({exc})", "a valid .safetensors file")) from exc


_LAYER_KEY = re.compile(r"^" + re.escape(_E) + r"layers\.(\d+)\.")


def check_layer_count(files: list[Path], cfg: NVEmbedConfig) -> None:
    """Compare the decoder layers the weights hold with ``num_hidden_layers`` (key names only).

    A config naming the wrong layer count would otherwise surface as "missing keys" or an
    "unexpected key", which sends the user looking for lost weights.
    """
    from safetensors import SafetensorError, safe_open

    layers: set[int] = set()
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as reader:
                layers.update(int(m.group(1)) for k in reader.keys() if (m := _LAYER_KEY.match(k)))  # noqa: SIM118
        except SafetensorError as exc:
            raise ArtifactError(fmt(str(f), f"corrupt safetensors file ({exc})", "a valid .safetensors file")) from exc
    n = cfg.text.num_hidden_layers
    held = max(layers) + 1 if layers else 0
    # Only a clean 0..M-1 run is a layer-count mismatch; a stray key is named by the strict loader.
    if layers and held != n and layers == set(range(held)):
        raise ArtifactError(fmt("config.json text_config.num_hidden_layers", n,
                                f"the weights hold {held} decoder layers; set num_hidden_layers to {held}"))


def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_path, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_path)
    mod._parameters[attr] = nn.Parameter(value, requires_grad=False)


def load_model(
    path: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    config: NVEmbedConfig | None = None,
) -> NVEmbedModel:
    """Load a released-layout checkpoint into :class:`NVEmbedModel`.

    The model is built on the meta device and each tensor is read, cast and moved one at a
    time, so peak memory is about one model in the target dtype plus one tensor.

    Args:
        path: checkpoint directory (config.json + model.safetensors or sharded index).
        dtype: target dtype (``float32``, ``float16``, ``bfloat16``). Defaults to float32.
        device: target device. Defaults to ``"cpu"``.
        config: override the directory's config. Defaults to None.

    Returns:
        The model in eval mode with gradients off.

    Raises:
        ArtifactError: missing files, unknown/missing/mis-shaped keys.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ArtifactError(fmt("checkpoint", f"{directory} is not a directory", "a checkpoint directory"))
    cfg = config or NVEmbedConfig.from_file(directory)
    files = safetensors_files(directory)
    target = dtype_from_name(dtype)
    device = torch.device(device)
    check_layer_count(files, cfg)
    with torch.device("meta"):
        model = NVEmbedModel(cfg)
    expected = {name: p.shape for name, p in model.named_parameters()}
    seen: set[str] = set()
    for key, tensor in _iter_tensors(files):
        ours = to_ours(key)
        if ours is None:
            continue
        if ours not in expected:
            raise ArtifactError(fmt("checkpoint key", repr(key), f"config has no such parameter ({ours}); "
                                    "does config.json match the weights?"))
        if tensor.shape != expected[ours]:
            raise ArtifactError(fmt(f"checkpoint key {key!r}", f"shape {tuple(tensor.shape)}",
                                    f"shape {tuple(expected[ours])} from config.json"))
        _set_param(model, ours, tensor.to(device=device, dtype=target))
        seen.add(ours)
        del tensor
    missing = sorted(set(expected) - seen)
    if missing:
        raise ArtifactError(fmt("checkpoint", f"missing keys {[to_released(m) for m in missing[:5]]}"
                                f"{' ...' if len(missing) > 5 else ''}", "every NV-Embed-v2 weight"))
    model.reset_buffers(device)
    return model.eval()


def state_dict_released(model: NVEmbedModel) -> dict[str, torch.Tensor]:
    """Our parameters under the released key names."""
    return {to_released(name): p.detach() for name, p in model.named_parameters()}


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(
    model: NVEmbedModel,
    directory: str | Path,
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Save weights and config in the released layout (sharded with an index when large).

    Args:
        model: the model.
        directory: output directory (created).
        dtype: storage dtype. Defaults to the parameters' dtype.
        max_shard_bytes: shard size limit. Defaults to 5 GiB.

    Returns:
        The directory.
    """
    from safetensors.torch import save as st_save

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    target = dtype_from_name(dtype) if dtype is not None else next(model.parameters()).dtype
    tensors = {k: v.to("cpu", target).contiguous() for k, v in state_dict_released(model).items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    for stale in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    meta = {"format": "pt"}
    if len(shards) == 1:
        _atomic_write_bytes(out / "model.safetensors", st_save(shards[0], metadata=meta))
    else:
        weight_map = {}
        n = len(shards)
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            _atomic_write_bytes(out / name, st_save(shard, metadata=meta))
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _atomic_write_bytes(out / "model.safetensors.index.json", (json.dumps(index, indent=2) + "\n").encode())
    cfg = model.cfg.replace(torch_dtype=_DTYPE_NAMES[target])
    cfg.save(out)
    _write_integration_files(out)
    return out


def _write_integration_files(out: Path) -> None:
    from nvembed_sdk.integrations.st_files import write_st_files

    write_st_files(out)  # modules.json + prompts: sentence-transformers loads the checkpoint


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def random_checkpoint(cfg: NVEmbedConfig, directory: str | Path, tokenizer: str | Path, seed: int = 0,
                      std: float | None = None) -> Path:
    """A checkpoint of shape ``cfg`` with random weights and the tokenizer files of ``tokenizer``.

    What a new user tries first (an NV-Embed-shaped model before any training): linears and
    embeddings N(0, std), RMSNorm weights 1, latents N(0, 1).

    Args:
        cfg: the model shape; ``cfg.text.vocab_size`` is replaced by the tokenizer's.
        directory: output checkpoint directory (created).
        tokenizer: a checkpoint or tokenizer directory holding ``tokenizer.json``.
        seed: weight seed. Defaults to 0.
        std: weight standard deviation. Defaults to ``cfg.text.initializer_range``.

    Returns:
        The directory.
    """
    import dataclasses
    import shutil

    from nvembed_sdk.text import TextPipeline

    src = Path(tokenizer)
    if not (src / "tokenizer.json").is_file():
        raise ArtifactError(fmt("tokenizer", str(src), "a directory with tokenizer.json (e.g. models/nvembed-debian-small)"))
    text = dataclasses.replace(cfg.text, vocab_size=TextPipeline(src).vocab_size,
                               initializer_range=cfg.text.initializer_range if std is None else std)
    model = NVEmbedModel(cfg.replace(text=text)).init_weights(seed=seed).eval()
    out = save_model(model, directory)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return out
