"""The inference core shared by ``serve``, ``predict`` and ``drift``: resolve a model URI, load the
pyfunc once, check an input volume against the training geometry, segment it, and record the
input's profile."""
