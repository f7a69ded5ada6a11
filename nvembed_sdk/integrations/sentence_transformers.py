"""sentence-transformers (6.x) over any NV-Embed artifact: ``NVEmbedModule`` and ``NVEmbedSentenceTransformer``.

``NVEmbedModule`` is one input module: ``preprocess`` runs the SDK's text pipeline (the prompt is
the instruction, masked out of pooling exactly as :class:`~nvembed_sdk.Embedder` masks it) and
``forward`` runs the artifact's backend and L2-normalises, so a model is this one module.

Loading. Every checkpoint and bundle the SDK writes carries ``modules.json`` naming
``nvembed_sdk.integrations.sentence_transformers.NVEmbedModule``. sentence-transformers 6.x
imports a module class outside its own ``sentence_transformers.*`` namespace only with
``trust_remote_code=True`` (``sentence_transformers.util.misc.import_module_class``), even from a
local directory, so:

* ``NVEmbedSentenceTransformer(path)`` -- a ``SentenceTransformer`` subclass that resolves this
  one class reference itself -- loads without ``trust_remote_code``; every other class
  reference still goes through sentence-transformers' own check. It also applies ``precision``
  with the model's stored calibration ranges and allows ``truncate_dim`` only at declared widths.
* ``SentenceTransformer(path, trust_remote_code=True)`` loads the same module from the installed
  package (the model directory holds no Python files, so nothing is read from it); its
  ``precision="int8"`` computes ranges from the batch, as sentence-transformers does.

The artifact: the directory itself by default (checkpoint -> torch, bundle -> its backend);
``backend="onnx"`` on a checkpoint uses its ``onnx/`` bundle; ``model_kwargs={"artifact": "sub/dir"
or "engine.plan", "device": "cuda", "backend": ..., <backend options>}`` picks any other.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from nvembed_sdk.errors import ArtifactError, fmt
from nvembed_sdk.integrations._shared import lazy_getattr
from nvembed_sdk.integrations.st_files import MODULE_CONFIG, MODULE_REF, ST_FILES

_BUILT: dict[str, type] = {}
__all__ = ["NVEmbedModule", "NVEmbedSentenceTransformer"]  # noqa: F822 - built on first use by __getattr__


def resolve_artifact(directory: Path, artifact: str | None, st_backend: str | None) -> Path:
    """The artifact an ST model directory stands for (see the module docstring)."""
    if artifact:
        p = Path(artifact)
        return p if p.is_absolute() else directory / p
    if st_backend in (None, "torch"):
        return directory
    if st_backend == "onnx":
        if (directory / "nvembed.json").is_file():
            return directory
        if (directory / "onnx" / "nvembed.json").is_file():
            return directory / "onnx"
        raise ArtifactError(fmt(f"backend='onnx' for {directory}", "no ONNX bundle (nvembed.json) there or in onnx/",
                                f"nvembed-export --model {directory} --to onnx --output {directory / 'onnx'}"))
    raise ArtifactError(fmt("backend", repr(st_backend), "'torch' (the artifact's own) or 'onnx'; "
                                                         "engines: model_kwargs={'artifact': 'engine.plan'}"))


def _build() -> None:
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.input_module import InputModule

    from nvembed_sdk import output
    from nvembed_sdk.embedder import Embedder
    from nvembed_sdk.text import Batch

    class NVEmbedModule(InputModule):
        """An NV-Embed artifact as one sentence-transformers input module.

        Args:
            artifact: checkpoint dir, bundle dir, ``model.onnx`` or ``engine.plan``.
            backend: ``torch``, ``onnxruntime``, ``tensorrt``. Defaults to the artifact's own.
            device: ``cpu``, ``cuda``. Defaults to CUDA when available.
            max_seq_length: truncation length in tokens. Defaults to the artifact's.
            **options: backend options for :meth:`Embedder.load`.
        """

        config_file_name = MODULE_CONFIG
        config_keys = ["artifact"]
        save_in_root = True

        def __init__(self, artifact: str | Path, backend: str | None = None, device: str | None = None,
                     max_seq_length: int | None = None, **options: Any) -> None:
            super().__init__()
            self.embedder = Embedder.load(artifact, backend=backend, device=device, **options)
            self.artifact = None  # saved config: the artifact is the saved directory itself
            self.max_seq_length = int(max_seq_length or self.embedder.text.max_length)
            self.output_spec = output.OutputSpec.read(self.embedder.text.directory)

        @classmethod
        def load(cls, model_name_or_path: str, subfolder: str = "", model_kwargs: dict[str, Any] | None = None,
                 backend: str | None = None, **kwargs: Any) -> NVEmbedModule:
            directory = Path(model_name_or_path) / subfolder
            if not directory.is_dir():
                raise ArtifactError(fmt("NVEmbedModule", f"{model_name_or_path!r} is not a local directory",
                                        "a checkpoint or bundle directory (nvembed-sdk never downloads models)"))
            config = cls.load_config(str(directory))
            mk = dict(model_kwargs or {})
            target = resolve_artifact(directory, mk.pop("artifact", None) or config.get("artifact"), backend)
            return cls(target, backend=mk.pop("backend", None), device=mk.pop("device", None),
                       max_seq_length=mk.pop("max_seq_length", None), **mk)

        def preprocess(self, inputs: list[str], prompt: str | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
            from nvembed_sdk.text import check_texts

            text = self.embedder.text
            items = check_texts(inputs)
            instruction = prompt or ""
            ids = text.tokenize(items, instruction, self.max_seq_length)
            batch = text.collate(ids, text.instruction_length(instruction))  # pool mask drops the instruction
            return {k: torch.from_numpy(v) for k, v in batch.as_dict().items()}

        def forward(self, features: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
            device = features["input_ids"].device
            batch = Batch(*(features[k].cpu().numpy() for k in ("input_ids", "attention_mask", "pool_mask")))
            emb = torch.from_numpy(self.embedder.runner.run(batch)).to(device)  # (B, D) float32
            features["sentence_embedding"] = torch.nn.functional.normalize(emb, p=2, dim=1)
            return features

        def get_embedding_dimension(self) -> int:
            return self.embedder.dim

        def get_sentence_embedding_dimension(self) -> int:
            return self.embedder.dim

        def save(self, output_path: str, *args: Any, **kwargs: Any) -> None:
            """Copy the artifact's files (weights, tokenizer, manifest) and write the module config."""
            out = Path(output_path)
            out.mkdir(parents=True, exist_ok=True)
            src = Path(self.embedder.text.directory)
            if src.resolve() != out.resolve():
                for f in src.iterdir():
                    if f.is_file() and f.name not in ST_FILES and f.name != "README.md":
                        shutil.copy2(f, out / f.name)
            self.save_config(str(out))

        def __repr__(self) -> str:
            return f"NVEmbedModule({self.embedder!r})"

    class NVEmbedSentenceTransformer(SentenceTransformer):
        """``SentenceTransformer`` for NV-Embed artifacts: loads without ``trust_remote_code``.

        Same constructor and methods as ``SentenceTransformer``. Differences: the
        ``NVEmbedModule`` class reference resolves to this package's class (every other one is
        checked by sentence-transformers as usual); ``precision`` int8/uint8 use the ranges
        stored with the model (``embedding_output.json``), never the batch's; ``truncate_dim``
        must be a width the model declares; ``device`` is where the artifact runs (the module
        holds no torch parameters for ``.to()`` to move, so it reaches ``NVEmbedModule.load``
        as ``model_kwargs["device"]`` unless that is set).
        """

        def __init__(self, model_name_or_path: str | Path | None = None, *, device: Any = None,
                     model_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
            if device is not None and "device" not in (model_kwargs or {}):
                model_kwargs = {**(model_kwargs or {}), "device": str(device)}
            super().__init__(model_name_or_path, device=device, model_kwargs=model_kwargs, **kwargs)

        def _load_module_class_from_ref(self, class_ref: str, *args: Any, **kwargs: Any) -> type:
            if class_ref == MODULE_REF:
                return NVEmbedModule
            return super()._load_module_class_from_ref(class_ref, *args, **kwargs)

        def encode(self, inputs: Any, prompt_name: str | None = None, prompt: str | None = None,
                   batch_size: int = 32, show_progress_bar: bool | None = None,
                   output_value: str | None = "sentence_embedding", precision: str = "float32",
                   convert_to_numpy: bool = True, convert_to_tensor: bool = False, device: Any = None,
                   normalize_embeddings: bool = False, truncate_dim: int | None = None, **kwargs: Any) -> Any:
            output.check_precision(precision)
            width = truncate_dim if truncate_dim is not None else self.truncate_dim
            if output_value != "sentence_embedding" or not isinstance(self[0], NVEmbedModule):
                return super().encode(inputs, prompt_name=prompt_name, prompt=prompt, batch_size=batch_size,
                                      show_progress_bar=show_progress_bar, output_value=output_value,
                                      precision=precision, convert_to_numpy=convert_to_numpy,
                                      convert_to_tensor=convert_to_tensor, device=device,
                                      normalize_embeddings=normalize_embeddings, truncate_dim=width, **kwargs)
            emb = super().encode(inputs, prompt_name=prompt_name, prompt=prompt, batch_size=batch_size,
                                 show_progress_bar=show_progress_bar, precision="float32", convert_to_numpy=True,
                                 device=device, normalize_embeddings=False,
                                 truncate_dim=self[0].embedder.dim, **kwargs)  # full width: self.truncate_dim is ours
            if isinstance(emb, list) or emb.size == 0:  # [] in, nothing to convert
                return torch.tensor([]) if convert_to_tensor else emb
            # The module's outputs are unit vectors; truncation renormalises (ST renormalises only on request).
            out = output.apply(np.asarray(emb), self[0].output_spec, precision, width, normalize=True)
            if convert_to_tensor:
                return torch.from_numpy(out)
            if convert_to_numpy:
                return out
            return list(torch.from_numpy(out)) if out.ndim == 2 else torch.from_numpy(out)

    for cls in (NVEmbedModule, NVEmbedSentenceTransformer):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
        _BUILT[cls.__name__] = cls


# The classes subclass sentence-transformers types, so they are built on first use (STYLE habit 4).
__getattr__ = lazy_getattr(__name__, __all__, "sentence_transformers", _build, _BUILT)
