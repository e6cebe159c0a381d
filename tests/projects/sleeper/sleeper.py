"""Starts a run, writes a checkpoint, spawns a grandchild, then sleeps: for Ctrl-C tests."""

import os
import subprocess
import sys
import time

import mlflow

with mlflow.start_run():
    mlflow.log_metric("step", 1)
    with open("checkpoint.txt", "w") as fh:
        fh.write("epoch 1\n")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open("pids.txt", "w") as fh:
        fh.write(f"{os.getpid()} {child.pid}\n")
    print("sleeping", flush=True)
    time.sleep(int(sys.argv[1]))
