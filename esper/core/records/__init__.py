"""The run directory's records: its layout and lock (``rundir``, ``runlock``), operator requests
(``requests``), the one event emitter (``telemetry``), reading ``events.jsonl`` back (``event_log``) and
TensorBoard output (``tensorboard``)."""
