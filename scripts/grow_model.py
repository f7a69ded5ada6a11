"""Moved: ``nvembed grow`` (logic in ``nvembed_sdk/train/grow.py``). Kept so old commands still run.

Usage:
    python scripts/grow_model.py --model DIR [--intermediate-size N] [--layers L] --output OUT [--seed 0]
"""

from nvembed_sdk.cli import main

if __name__ == "__main__":
    import sys

    main(["grow", *sys.argv[1:]], prog_name="nvembed")
