"""``mlpipe drift``/``compare``: new volumes against the training profile, runs side by side."""
