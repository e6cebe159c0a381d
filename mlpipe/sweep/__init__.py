"""Hyperparameter sweeps: Optuna studies whose trials are checked ``mlpipe run``s."""
