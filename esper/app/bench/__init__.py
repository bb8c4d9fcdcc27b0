"""The performance harness behind ``esper bench`` (SPEC §9, P-1..P-6, plus peak memory).

It measures the engine's own code against plain-PyTorch baselines, alternating in one process:

- ``stats``: the plan, alternating measurements, ratios and their statistics, the machine line;
- ``baseline``: the plain-PyTorch side (the P-1 loop, and the plain training process of the memory row);
- ``p1``: Esper's train step through a built trainer's public methods; ``state``: fast rollback (P-2) and
  verified checkpoints (P-3/P-4); ``micro``: lifecycle and validation costs (P-5), decisions (P-6);
  ``memory`` + ``launcher``: peak RSS of real processes; ``run``: the whole document.

Deliberately no re-exports here: the child processes import ``baseline`` and ``launcher`` without the rest.
"""
