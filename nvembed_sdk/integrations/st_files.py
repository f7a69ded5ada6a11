"""The sentence-transformers files every checkpoint and bundle of this SDK carries (plain JSON, no imports).

``modules.json`` names one module, :class:`nvembed_sdk.integrations.sentence_transformers.NVEmbedModule`,
saved in the root; ``config_sentence_transformers.json`` holds the query and document prompts
(the query prompt is NV-Embed's ``Instruct: {task}\\nQuery: ``; documents get none) and
``sentence_nvembed_config.json`` the module's own settings. Writing them is one call from the
checkpoint writer and from the exporters, kept apart so those files change by one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

MODULE_REF = "nvembed_sdk.integrations.sentence_transformers.NVEmbedModule"
MODULE_CONFIG = "sentence_nvembed_config.json"
ST_FILES = ("modules.json", "config_sentence_transformers.json", MODULE_CONFIG)
ST_LAYOUT_VERSION = "6.0.0"  # the sentence-transformers release whose loading rules these files follow


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_st_files(directory: str | Path, source: str | Path | None = None, task: str | None = None) -> None:
    """Write the sentence-transformers files into an artifact directory.

    Prompts already in the directory's ``config_sentence_transformers.json`` are kept (a user's
    own). The model's ``embedding_output.json`` (calibration ranges, truncation widths) is
    copied from ``source`` when the artifact is built from another directory.

    Args:
        directory: checkpoint or bundle directory.
        source: the checkpoint the artifact was built from. Defaults to None.
        task: the query task of the ``query`` prompt. Defaults to the SDK's default task.
    """
    from nvembed_sdk.embedder import DEFAULT_TASK, query_instruction
    from nvembed_sdk.output import OUTPUT_FILE

    out = Path(directory)
    cfg_path = out / "config_sentence_transformers.json"
    prompts = {"query": query_instruction(task or DEFAULT_TASK), "document": ""}
    if source is not None and (Path(source) / cfg_path.name).is_file():
        cfg_path_src = Path(source) / cfg_path.name
    else:
        cfg_path_src = cfg_path
    if cfg_path_src.is_file():
        with contextlib.suppress(json.JSONDecodeError, AttributeError):  # an unreadable file is replaced
            prompts = {**prompts, **json.loads(cfg_path_src.read_text(encoding="utf-8")).get("prompts", {})}
    _write_json(out / "modules.json", [{"idx": 0, "name": "0", "path": "", "type": MODULE_REF}])
    _write_json(cfg_path, {"model_type": "SentenceTransformer", "__version__": {"sentence_transformers": ST_LAYOUT_VERSION},
                           "prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"})
    if not (out / MODULE_CONFIG).is_file():
        _write_json(out / MODULE_CONFIG, {"artifact": None})
    if source is not None:
        src = Path(source) / OUTPUT_FILE
        if src.is_file() and src.resolve() != (out / OUTPUT_FILE).resolve():
            shutil.copyfile(src, out / OUTPUT_FILE)
