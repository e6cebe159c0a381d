"""``mlpipe run``, ``init``, ``validate``: load and lint an MLproject, check ``-P`` values, fetch
the source without touching it, and launch the entry point through MLflow Projects."""
