"""Run ``nvembed ARGS`` and stop the process (SIGSTOP) at one phase of a staged export, so a
test can SIGKILL the real export process exactly there (tests/integration/test_bundle_staging.py).

    python -P export_kill_driver.py PHASE export --model DIR --to onnx --output OUT ...

PHASE: model-written (model + tokenizer in staging, no manifest), validating (manifest written,
validation not run), validated (the exporter returned; final checks and the rename not done),
exchanged (new bundle swapped in, the old one not yet deleted), aside (no atomic exchange: old
bundle renamed aside, the new one not yet renamed in), none.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any


def _stop() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGSTOP)


def _patch(module: Any, name: str, stop_after: bool = False) -> None:
    real = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not stop_after:
            _stop()
        out = real(*args, **kwargs)
        if stop_after:
            _stop()
        return out

    setattr(module, name, wrapper)


def main() -> None:
    import nvembed_sdk.exporters.onnx_export as onnx_export
    import nvembed_sdk.exporters.staging as staging
    import nvembed_sdk.exporters.validate as validate
    from nvembed_sdk.cli import main as cli

    phase, args = sys.argv[1], sys.argv[2:]
    if phase == "model-written":
        _patch(onnx_export, "write_manifest")
    elif phase == "validating":
        _patch(validate, "validate_export")
    elif phase == "validated":
        _patch(staging, "_check_complete")
    elif phase == "exchanged":
        _patch(staging, "_exchange", stop_after=True)
    elif phase == "aside":
        staging._exchange = lambda a, b: False  # the fallback path: two renames
        _patch(staging, "_rename_aside", stop_after=True)
    elif phase != "none":
        raise SystemExit(f"unknown phase {phase!r}")
    cli(args, prog_name="nvembed")


if __name__ == "__main__":
    main()
