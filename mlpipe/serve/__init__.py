"""``mlpipe serve``: the HTTP layer over the inference core (routes, auth, limits, sockets)."""
