"""Run ``nvembed ARGS`` and stop the process (SIGSTOP) inside its Nth checkpoint write, so a test
can SIGKILL the real training process exactly there (tests/unit/test_train_hardening.py).

    python -P train_kill_driver.py PHASE N train CONFIG ...

PHASE: state (the Nth checkpoint's weights are in its temp directory, its trainer_state.pt is
half written), renamed (the Nth checkpoint is in place, older ones not yet pruned).
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


def main() -> None:
    import nvembed_sdk.train.loop as loop
    import nvembed_sdk.train.run_state as run_state  # write_model_dir's own module calls save_torch
    from nvembed_sdk.cli import main as cli

    phase, nth, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    calls = [0]
    if phase == "state":
        real_save = run_state.save_torch

        def save_torch(obj: Any, path: Any) -> None:
            calls[0] += 1
            if calls[0] == nth:
                with open(path, "wb") as fh:  # a torn write: the first bytes of the state only
                    fh.write(b"PK\x03\x04" + b"\x00" * 1000)
                _stop()
            real_save(obj, path)

        run_state.save_torch = save_torch
    elif phase == "renamed":
        real_write = loop.write_model_dir

        def write_model_dir(*a: Any, **kw: Any) -> None:
            real_write(*a, **kw)
            if kw.get("extra", a[5] if len(a) > 5 else None) is not None:
                calls[0] += 1
                if calls[0] == nth:
                    _stop()

        loop.write_model_dir = write_model_dir
    else:
        raise SystemExit(f"unknown phase {phase!r}")
    cli(args, prog_name="nvembed")


if __name__ == "__main__":
    main()
