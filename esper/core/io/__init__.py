"""Safe file I/O, the bottom of the engine: bounded reads (``bounded``), paths confined to a directory
(``confine``), fsyncs (``durable``), every JSONL file (``jsonl``) and every TOML file (``tomlfile``).
Nothing here knows about training."""
