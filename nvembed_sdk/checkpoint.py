"""Checkpoint I/O through explicit key tables, one per checkpoint family.

A table maps a checkpoint key (safetensors) to our module path; ``{}`` is the layer index and
``None`` means drop. :data:`FROM_RELEASED` is the released NV-Embed-v2 layout (what
:func:`load_model` and :func:`save_model` use); :data:`FROM_MISTRAL_CAUSAL_LM` is a Mistral
causal LM's (``model.*`` -> the decoder, ``lm_head`` dropped), which the training start-up
reads into a fresh NV-Embed decoder. :func:`load_weights` is the one loader both go through:
every key of a checkpoint must be consumed and every expected parameter filled; any leftover,
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

# A Mistral causal LM (``MistralForCausalLM``): the same decoder under ``model.``, plus the LM
# head, which an embedding model does not use.
FROM_MISTRAL_CAUSAL_LM: dict[str, str | None] = {
    "model." + k[len(_E):]: v for k, v in FROM_RELEASED.items() if k.startswith(_E)
} | {"lm_head.weight": None}


class KeyTable:
    """A compiled key table: ``to_ours`` (checkpoint -> ours) and ``to_theirs`` (ours -> checkpoint).

    Args:
        table: checkpoint key -> our name (``{}`` the layer index, None to drop).
        family: what the checkpoint is, for error messages (e.g. ``an NV-Embed-v2``).
    """

    def __init__(self, table: dict[str, str | None], family: str) -> None:
        self.table, self.family = table, family
        self._from = [(re.compile("^" + re.escape(k).replace(r"\{\}", r"(\d+)") + "$"), v) for k, v in table.items()]
        self._to = [(re.compile("^" + re.escape(v).replace(r"\{\}", r"(\d+)") + "$"), k)
                    for k, v in table.items() if v is not None]

    def to_ours(self, key: str) -> str | None:
        """Checkpoint key -> our parameter name (None: dropped); raises for a key the table does not know."""
        for pattern, ours in self._from:
            m = pattern.match(key)
            if m:
                return None if ours is None else ours.replace("{}", m.group(1)) if m.groups() else ours
        raise ArtifactError(fmt("checkpoint key", repr(key), f"{self.family} key (unexpected key)"))

    def to_theirs(self, name: str) -> str:
        for pattern, theirs in self._to:
            m = pattern.match(name)
            if m:
                return theirs.replace("{}", m.group(1)) if m.groups() else theirs
        raise ArtifactError(fmt("parameter", repr(name), "a parameter of NVEmbedModel"))


RELEASED = KeyTable(FROM_RELEASED, "an NV-Embed-v2")
MISTRAL_CAUSAL_LM = KeyTable(FROM_MISTRAL_CAUSAL_LM, "a Mistral causal-LM ('model.*' or 'lm_head.weight')")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

def to_ours(key: str) -> str | None:
    """Released key -> our parameter name; raises for a key the table does not know."""
    return RELEASED.to_ours(key)


def to_released(name: str) -> str:
    return RELEASED.to_theirs(name)


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


def load_weights(
    model: nn.Module,
    files: list[Path],
    table: KeyTable,
    expected: dict[str, torch.Size],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> None:
    """Read checkpoint tensors into ``model`` (built on meta) through ``table``, one at a time.

    Args:
        model: the module whose parameters are filled (replaced, ``requires_grad`` off).
        files: the safetensors files (:func:`safetensors_files`).
        table: the checkpoint family's key table.
        expected: our parameter name -> shape, every one of which must be filled.
        dtype: target dtype. Defaults to float32.
        device: target device. Defaults to ``"cpu"``.

    Raises:
        ArtifactError: an unknown, unexpected, mis-shaped or missing key, named.
    """
    seen: set[str] = set()
    for key, tensor in _iter_tensors(files):
        ours = table.to_ours(key)
        if ours is None:
            continue
        if ours not in expected:
            raise ArtifactError(fmt("checkpoint key", repr(key), f"config has no such parameter ({ours}); "
                                    "does config.json match the weights?"))
        if tensor.shape != expected[ours]:
            raise ArtifactError(fmt(f"checkpoint key {key!r}", f"shape {tuple(tensor.shape)}",
                                    f"shape {tuple(expected[ours])} from config.json"))
        _set_param(model, ours, tensor.to(device=device, dtype=dtype))
        seen.add(ours)
        del tensor
    missing = sorted(set(expected) - seen)
    if missing:
        raise ArtifactError(fmt("checkpoint", f"missing keys {[table.to_theirs(m) for m in missing[:5]]}"
                                f"{' ...' if len(missing) > 5 else ''}", f"every weight of {table.family} checkpoint"))


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
    load_weights(model, files, RELEASED, expected, target, device)
    model.reset_buffers(device)
    return model.eval()


def state_dict_released(model: NVEmbedModel) -> dict[str, torch.Tensor]:
    """Our parameters under the released key names."""
    return {to_released(name): p.detach() for name, p in model.named_parameters()}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """``data`` at ``path`` through a temp file beside it, renamed into place (whole or not at all)."""
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


class _WholeWrites:
    """A file torch.save writes through that remembers the OSError of a failed write.

    torch's zip writer turns a failed write (a full disk) into ``RuntimeError("unexpected pos
    ...")``; :func:`save_torch` re-raises the OSError (ENOSPC) it was, so the caller can name the
    file and the fix.
    """

    def __init__(self, fh: object) -> None:
        self._fh = fh
        self.error: OSError | None = None

    def write(self, data: object) -> int:
        view = memoryview(data).cast("B")  # type: ignore[arg-type]
        done = 0
        try:
            while done < len(view):
                done += self._fh.write(view[done:])  # type: ignore[attr-defined]  # raw FileIO: short or OSError
        except OSError as exc:
            self.error = exc
            raise
        return done

    def flush(self) -> None:  # raw FileIO: nothing buffered here
        pass


def save_torch(obj: object, path: str | Path) -> None:
    """``torch.save(obj, path)`` whose full-disk failure is an OSError (ENOSPC), not a RuntimeError."""
    with open(path, "wb", buffering=0) as fh:
        writer = _WholeWrites(fh)
        try:
            torch.save(obj, writer)  # type: ignore[arg-type]
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
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
        atomic_write_bytes(out / "model.safetensors", st_save(shards[0], metadata=meta))
    else:
        weight_map = {}
        n = len(shards)
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            atomic_write_bytes(out / name, st_save(shard, metadata=meta))
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_bytes(out / "model.safetensors.index.json", (json.dumps(index, indent=2) + "\n").encode())
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
