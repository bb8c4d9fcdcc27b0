"""Model pieces: the built-in hosts (``host``, ``transformer``), the optimizer and LR schedule (``optim``), the
RNG helpers (``rng``) and the ``run.device``/``run.precision`` preflight (``device``)."""
