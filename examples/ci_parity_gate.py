"""A CI gate: fail the pipeline when a deployed artifact drifts from the PyTorch reference.

    python examples/ci_parity_gate.py --reference models/nvembed-debian-small --candidate out/onnx-int8 \\
        [--texts my_queries.txt] [--report parity.json]

Exit code 0 when every per-row cosine and the top-10 agreement are inside the budget of the
candidate's precision (README "Precision and parity budget": fp32 0.99999, fp16/bf16 0.999, int8/fp8 0.99), 1 otherwise.
The same check is ``nvembed parity REFERENCE CANDIDATE``; this script shows the Python helper
(:func:`nvembed_sdk.parity.assert_parity`) for pipelines that want the report object.

GitHub Actions step:

    - name: Embedding parity
      run: python examples/ci_parity_gate.py --reference $MODEL --candidate out/engine --report parity.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nvembed_sdk import ToleranceExceeded
from nvembed_sdk.parity import assert_parity
from nvembed_sdk.textsets import read_texts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, help="reference artifact (the fp32 checkpoint)")
    ap.add_argument("--candidate", required=True, help="artifact under test (bundle, model.onnx, engine.plan)")
    ap.add_argument("--texts", default=None, help="texts to compare on (default: the SDK's held-out real text)")
    ap.add_argument("--min-cosine", type=float, default=None, help="override the per-row cosine budget, in (0, 1]")
    ap.add_argument("--report", default=None, help="write the JSON report here")
    args = ap.parse_args()
    texts = read_texts(args.texts) if args.texts else None
    try:
        report = assert_parity(args.reference, args.candidate, texts=texts, min_cosine=args.min_cosine)
        code = 0
    except ToleranceExceeded as exc:
        report, code = exc.report, 1
    print(report)
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return code


if __name__ == "__main__":
    sys.exit(main())
