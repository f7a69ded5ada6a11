"""NV-Embed configuration: reads and writes the released NV-Embed-v2 ``config.json`` format.

The released file has a top level (``model_type "nvembed"``), a ``text_config`` holding a Mistral
config (``model_type "bidir_mistral"``) and a ``latent_attention_config`` that may hold only
``{"model_type": "latent_attention"}``; every missing field takes the released class defaults
(reference/NV-Embed-v2.md §1).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvembed_sdk.errors import ArtifactError, fmt
from nvembed_sdk.validate import check_fields, check_range


@dataclass(frozen=True)
class DecoderConfig:
    """Bidirectional Mistral decoder (released ``text_config``)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads (released files omit it)
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    sliding_window: int | None = 4096  # stored by the release, never applied (bidirectional path)
    bos_token_id: int = 1
    eos_token_id: int = 2
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        check_fields(self, "text_config.", ArtifactError)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings", "head_dim"):
            if getattr(self, name) is not None:
                check_range(f"text_config.{name}", getattr(self, name), 1, error=ArtifactError)
        for name in ("rope_theta", "rms_norm_eps"):
            check_range(f"text_config.{name}", getattr(self, name), 0, lo_open=True, error=ArtifactError)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ArtifactError(
                fmt("text_config.num_key_value_heads", self.num_key_value_heads,
                    f"must divide num_attention_heads ({self.num_attention_heads})")
            )
        if self.hidden_act != "silu":
            raise ArtifactError(fmt("text_config.hidden_act", repr(self.hidden_act), "only 'silu' (Mistral)"))

    @property
    def num_parameters(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
        return v * h + self.num_hidden_layers * per_layer + h


@dataclass(frozen=True)
class LatentAttentionConfig:
    """Latent-attention pooling head (released ``latent_attention_config`` defaults)."""

    num_latents_value: int = 512
    num_cross_heads: int = 8
    cross_dim_head: int = 4096
    latent_dim: int = 4096
    hidden_dim: int = 4096
    output_normalize: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "latent_attention_config.", ArtifactError)
        for f in dataclasses.fields(self):
            if f.name != "output_normalize":
                check_range(f"latent_attention_config.{f.name}", getattr(self, f.name), 1, error=ArtifactError)

    @property
    def inner_dim(self) -> int:
        return self.num_cross_heads * self.cross_dim_head

    @property
    def num_parameters(self) -> int:
        d, inner, c = self.latent_dim, self.inner_dim, self.hidden_dim
        latents = self.num_latents_value * d
        norms = 2 * d + 2 * c + 2 * d  # two LayerNorms of block 0, one of block 1 (weight + bias)
        attn = d * inner + c * 2 * inner + inner * d
        ff = (d * 8 * d + 8 * d) + (4 * d * d + d)
        return latents + norms + attn + ff


_DECODER_KEYS = {f.name for f in dataclasses.fields(DecoderConfig)}
_LATENT_KEYS = {f.name for f in dataclasses.fields(LatentAttentionConfig)}


@dataclass(frozen=True)
class NVEmbedConfig:
    """Whole-model config: decoder, latent head and the released text settings.

    Attributes:
        text: decoder config.
        latent: latent-attention config.
        padding_side: always ``"right"`` for NV-Embed (the pool rule depends on it).
        is_mask_instruction: exclude the instruction tokens from pooling.
        add_eos: stored by the release; ``encode()`` always appends EOS regardless.
        max_length: default truncation length of the text pipeline (the released
            ``encode()`` default is 4096).
        torch_dtype: dtype the weights are stored in (``"float16"`` for the release).
        extra_text_config: unknown ``text_config`` keys, kept so that writing the file back
            loses nothing.
    """

    text: DecoderConfig = field(default_factory=DecoderConfig)
    latent: LatentAttentionConfig = field(default_factory=LatentAttentionConfig)
    padding_side: str = "right"
    add_pad_token: bool = True
    is_mask_instruction: bool = True
    add_eos: bool = True
    mask_type: str = "b"
    max_length: int = 4096
    torch_dtype: str = "float16"
    extra_text_config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        check_fields(self, "", ArtifactError)
        check_range("nvembed_max_length", self.max_length, 1, error=ArtifactError)
        t, la = self.text, self.latent
        # The released code feeds decoder states to the "latent_dim" LayerNorm and the latents to
        # the "hidden_dim" LayerNorm (reference §3.3 naming quirk): it only works when all are equal.
        if not (t.hidden_size == la.latent_dim == la.hidden_dim):
            raise ArtifactError(
                fmt("latent_attention_config", f"latent_dim={la.latent_dim}, hidden_dim={la.hidden_dim}, "
                    f"text hidden_size={t.hidden_size}", "all three must be equal (released architecture)")
            )
        if self.padding_side != "right":
            raise ArtifactError(fmt("padding_side", repr(self.padding_side), "NV-Embed needs 'right'"))

    @property
    def dim(self) -> int:
        """Embedding width."""
        return self.latent.latent_dim

    @property
    def num_parameters(self) -> int:
        return self.text.num_parameters + self.latent.num_parameters

    # ---- released format ------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NVEmbedConfig:
        """Build from the released ``config.json`` dict (unknown fields are ignored or kept)."""
        if not isinstance(d, dict) or "text_config" not in d:
            raise ArtifactError(fmt("config.json", "no 'text_config'", "an NV-Embed config (model_type 'nvembed')"))
        for key in ("text_config", "latent_attention_config"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise ArtifactError(fmt(f"config.json {key}", f"a {type(d[key]).__name__}",
                                        "a JSON object (the released NV-Embed-v2 format)"))
        tc = dict(d["text_config"])
        text_kwargs = {k: tc[k] for k in _DECODER_KEYS if k in tc and tc[k] is not None}
        extra = {k: v for k, v in tc.items() if k not in _DECODER_KEYS}
        if "sliding_window" in tc:  # keep an explicit null
            text_kwargs["sliding_window"] = tc["sliding_window"]
        lc = d.get("latent_attention_config") or {}
        latent_kwargs = {k: lc[k] for k in _LATENT_KEYS if k in lc}
        top = {k: d[k] for k in ("padding_side", "add_pad_token", "is_mask_instruction", "add_eos",
                                 "mask_type", "torch_dtype") if k in d and d[k] is not None}
        if "nvembed_max_length" in d:
            top["max_length"] = d["nvembed_max_length"]
        try:
            return cls(text=DecoderConfig(**text_kwargs), latent=LatentAttentionConfig(**latent_kwargs),
                       extra_text_config=extra, **top)
        except TypeError as exc:  # wrong value types in the file
            raise ArtifactError(fmt("config.json", str(exc), "the released NV-Embed-v2 format")) from exc

    @classmethod
    def from_file(cls, path: str | Path) -> NVEmbedConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ArtifactError(fmt("config.json", f"no file at {path}", "a checkpoint directory with config.json"))
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(fmt(str(path), f"invalid JSON ({exc})", "the released config.json format")) from exc
        try:
            return cls.from_dict(data)
        except ArtifactError as exc:
            raise ArtifactError(f"{path}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """The released ``config.json`` layout, loadable by NVIDIA's remote code too."""
        text = dict(self.extra_text_config)
        text.setdefault("_name_or_path", "nvidia/NV-Embed-v2")
        text.setdefault("architectures", ["MistralModel"])
        text.setdefault("model_type", "bidir_mistral")
        text.setdefault("attention_dropout", 0.0)
        text.setdefault("pad_token_id", None)
        text.setdefault("tie_word_embeddings", False)
        text.setdefault("use_cache", True)
        text.setdefault("torch_dtype", "float32")
        for k in sorted(_DECODER_KEYS):
            v = getattr(self.text, k)
            if k == "head_dim" and v == self.text.hidden_size // self.text.num_attention_heads:
                continue  # the release leaves it implicit
            text[k] = v
        latent = {"model_type": "latent_attention", **dataclasses.asdict(self.latent)}
        return {
            "_name_or_path": "nvidia/NV-Embed-v2",
            "add_eos": self.add_eos,
            "add_pad_token": self.add_pad_token,
            "architectures": ["NVEmbedModel"],
            "auto_map": {
                "AutoConfig": "configuration_nvembed.NVEmbedConfig",
                "AutoModel": "modeling_nvembed.NVEmbedModel",
            },
            "hidden_size": self.text.hidden_size,
            "is_mask_instruction": self.is_mask_instruction,
            "latent_attention_config": latent,
            "mask_type": self.mask_type,
            "model_type": "nvembed",
            "nvembed_max_length": self.max_length,
            "padding_side": self.padding_side,
            "text_config": dict(sorted(text.items())),
            "torch_dtype": self.torch_dtype,
            "transformers_version": "4.42.4",
        }

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    def replace(self, **changes: Any) -> NVEmbedConfig:
        return dataclasses.replace(self, **changes)


def _tiny(vocab_size: int = 32000) -> NVEmbedConfig:
    return NVEmbedConfig(
        text=DecoderConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
        latent=LatentAttentionConfig(num_latents_value=16, num_cross_heads=2, cross_dim_head=32,
                                     latent_dim=64, hidden_dim=64),
        max_length=512,
        torch_dtype="float32",
    )


PRESETS: dict[str, NVEmbedConfig] = {
    "nv-embed-v2": NVEmbedConfig(),
    "tiny-test": _tiny(),
}
