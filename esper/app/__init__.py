"""The application tier, above the engine (``esper.core``) and below the CLI: a training session and its
scale-out (``session``, ``scaleout``), ``compare``, drills, runbooks and their process trees, the preflight,
``bench`` and the read-only operator ``views``. Nothing in ``esper.core`` imports from here."""
