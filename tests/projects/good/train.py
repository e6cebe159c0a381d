"""Logs what it was given, so tests can see the values that reached the command."""

import argparse
import json

import mlflow

parser = argparse.ArgumentParser()
for name in ("--alpha", "--epochs", "--amp", "--model", "--data-dir", "--out"):
    parser.add_argument(name)
args, extra = parser.parse_known_args()
with mlflow.start_run():
    mlflow.log_metric("score", float(args.alpha or 0) * 2)
    mlflow.log_dict({"args": vars(args), "extra": extra}, "received.json")
print("received", json.dumps(vars(args)), extra)
