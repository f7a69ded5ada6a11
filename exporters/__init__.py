"""Exporters: checkpoint -> ONNX bundle -> quantised ONNX -> TensorRT engine.

Imported as ``nvembed_sdk.exporters``. Names only here; each exporter imports its heavy
dependencies (onnx, modelopt, tensorrt) when called.
"""

from __future__ import annotations
