"""A tiny trainable for sweep tests: logs ``score`` every step with mlpipe.log.

Without ``--script`` the score follows from the parameters. With ``--script DIR``, each trial
claims the next line of ``DIR/scores.txt`` (atomically, so parallel trials never share one):
a number is the score it logs at every step, ``crash`` exits 3 after one step, and a
``sleep`` line makes it run for a long time (a trial to kill).
"""

import argparse
import math
import os
import time

import mlpipe.log as mlog

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float)
parser.add_argument("--model")
parser.add_argument("--layers", type=int)
parser.add_argument("--steps", type=int)
parser.add_argument("--delay", type=float)
parser.add_argument("--script")
args = parser.parse_args()

line = None
if args.script != "-":
    with open(os.path.join(args.script, "scores.txt")) as fh:
        lines = fh.read().split()
    for index in range(len(lines)):
        try:
            os.close(os.open(os.path.join(args.script, f"claim-{index}"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        line = lines[index]
        break
    line = line or lines[-1]
    print(f"scripted: {line}", flush=True)

print(f"cuda={os.environ.get('CUDA_VISIBLE_DEVICES', '-')}", flush=True)
bonus = 0.1 if args.model == "segresnet" else 0.0
score = 1.0 - abs(math.log10(args.lr) + 2.5) / 3 + bonus + 0.01 * args.layers
steps, delay = args.steps, args.delay
if line == "sleep":
    steps, delay = 600, 0.5
for step in range(steps):
    value = float(line) if line not in (None, "crash", "sleep") else score
    mlog.metrics({"score": value * (step + 1) / steps if line is None else value}, step=step)
    print(f"step {step} score {value:.3f}", flush=True)
    if line == "crash":
        mlog.flush()
        raise SystemExit(3)
    time.sleep(delay)
