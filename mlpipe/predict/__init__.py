"""``mlpipe predict``: batch segmentation of folders of volumes with a registered model, each
batch (each shard) recorded as an MLflow inference run; ``--summary`` gathers the shards."""
