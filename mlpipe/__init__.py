"""mlpipe: a thin convention layer and CLI on top of MLflow 3.x.

Kept import-light on purpose: ``mlpipe --help`` must start without mlflow, torch or monai.
"""

__version__ = "0.1.0"
