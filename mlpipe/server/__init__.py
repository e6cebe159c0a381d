"""``mlpipe server``/``doctor``: the team tracking server (PostgreSQL + proxied S3 artifacts), the
``mlflow.app`` it runs, and the pre-flight checks a client runs against it."""
