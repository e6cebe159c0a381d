"""ElasticNet on a synthetic regression problem, as MLflow's tutorial does on wine data."""

import sys

import mlflow
import numpy as np
from sklearn.linear_model import ElasticNet
from sklearn.metrics import mean_squared_error

alpha, l1_ratio = float(sys.argv[1]), float(sys.argv[2])
rng = np.random.default_rng(0)
x = rng.normal(size=(200, 5))
y = x @ np.array([1.0, -1.0, 0.5, 0.0, 2.0]) + 0.1 * rng.normal(size=200)
with mlflow.start_run():
    model = ElasticNet(alpha=alpha, l1_ratio=l1_ratio, random_state=42).fit(x[:150], y[:150])
    rmse = float(np.sqrt(mean_squared_error(y[150:], model.predict(x[150:]))))
    mlflow.log_metric("rmse", rmse)
    print(f"Elasticnet model (alpha={alpha}, l1_ratio={l1_ratio}): rmse={rmse:.4f}")
