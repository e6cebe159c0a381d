"""The project's own check: classes must match the lines of <data_dir>/labels.txt.

Exits 2 with an ``Error:`` line to refuse; ``--classes -1`` crashes (a check that is broken,
not a refusal); otherwise says what it saw, including whether it was given a run to log to.
"""

import argparse
import os
import sys
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--data-dir", default="")
parser.add_argument("--classes", type=int, default=0)
args = parser.parse_args()
if args.classes == -1:
    raise RuntimeError("the check itself is broken")
labels = Path(args.data_dir, "labels.txt").read_text().split() if args.data_dir else []
if args.classes and labels and args.classes != len(labels):
    print("reading labels.txt", flush=True)
    print(
        f"Error: classes={args.classes} contradicts {args.data_dir}/labels.txt, which lists "
        f"{len(labels)} labels; drop -P classes",
        file=sys.stderr,
    )
    sys.exit(2)
print(f"checked: {len(labels)} labels")
print(
    f"preflight env: {os.environ.get('MLPIPE_PREFLIGHT')}, run id: "
    f"{os.environ.get('MLFLOW_RUN_ID', 'none')}"
)
