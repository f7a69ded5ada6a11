"""import nvembed_sdk must not pull onnxruntime, tensorrt or modelopt (STYLE habit 4)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("onnxruntime", "tensorrt", "modelopt", "onnx", "peft", "fastapi", "starlette", "uvicorn", "prometheus_client",
         "pydantic", "orjson")
# The integrations' frameworks (and what they pull): imported only when an adapter class is used.
INTEGRATIONS = ("sentence_transformers", "langchain_core", "llama_index", "mteb", "datasets")


def _loaded_after(code: str) -> list[str]:
    script = f"""
import sys, json
{code}
print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))
"""
    out = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_is_light():
    loaded = _loaded_after("import nvembed_sdk; from nvembed_sdk import Embedder; import nvembed_sdk.cli")
    assert not set(HEAVY + INTEGRATIONS) & set(loaded), set(HEAVY + INTEGRATIONS) & set(loaded)


def test_corpus_and_scale_out_modules_are_light():
    # ray and pyarrow load only when a corpus job runs
    loaded = _loaded_after("import nvembed_sdk.corpus, nvembed_sdk.corpus.ray_job, nvembed_sdk.cli_corpus, "
                           "nvembed_sdk.train.fsdp, nvembed_sdk.serve.ray_serve")
    assert not {"ray", "pyarrow", *HEAVY} & set(loaded), {"ray", "pyarrow", *HEAVY} & set(loaded)


def test_serve_package_and_settings_are_light():
    # the package, its settings and the batcher load without the serve extra's web stack
    loaded = _loaded_after("import nvembed_sdk.serve; from nvembed_sdk.serve.settings import ServeSettings; "
                           "import nvembed_sdk.serve.batcher; import nvembed_sdk.cli_serve")
    assert not set(HEAVY) & set(loaded), set(HEAVY) & set(loaded)


def test_every_submodule_imports_without_extras():
    code = """
import importlib, pkgutil, nvembed_sdk, nvembed_sdk.exporters, nvembed_sdk.runtimes
for pkg in (nvembed_sdk, nvembed_sdk.exporters, nvembed_sdk.runtimes):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):
        importlib.import_module(info.name)
"""
    loaded = _loaded_after(code)
    assert not {"onnxruntime", "tensorrt", "modelopt", "ray", "pyarrow"} & set(loaded)
    assert not set(INTEGRATIONS) & set(loaded), set(INTEGRATIONS) & set(loaded)


def test_integration_modules_import_without_their_frameworks():
    loaded = _loaded_after("import nvembed_sdk.integrations.sentence_transformers, nvembed_sdk.integrations.langchain, "
                           "nvembed_sdk.integrations.llamaindex, nvembed_sdk.integrations.mteb")
    assert not set(INTEGRATIONS) & set(loaded), set(INTEGRATIONS) & set(loaded)


def test_mapped_packages_resolve_inside_nvembed_sdk():
    import nvembed_sdk.exporters
    import nvembed_sdk.runtimes

    assert nvembed_sdk.runtimes.__name__ == "nvembed_sdk.runtimes"
    assert nvembed_sdk.exporters.__file__.replace("\\", "/").endswith("exporters/__init__.py")
