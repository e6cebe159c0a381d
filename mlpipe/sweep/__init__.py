"""``mlpipe sweep``: hyperparameter search with Optuna, every trial a checked ``mlpipe run``
and a child run of one parent; many workers share one study in PostgreSQL."""
