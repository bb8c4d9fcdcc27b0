"""What an operator looks at (V-1..V-3): ``read`` (every read of a run directory, in one module), ``history``
(a run's story from its files), ``status`` (finished, running or incomplete), ``follow`` (a run as it grows),
``plot`` (the PNG). The CLI's ``plot``, ``watch`` and ``runs`` render them."""
