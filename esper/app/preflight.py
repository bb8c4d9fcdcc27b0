"""What ``esper config validate`` checks beyond the schema, and ``esper train`` before it makes a run directory:
the config must be runnable here (S-1, issue 12 "valid means runnable").

- the device exists in this torch build (``run.device``) and has the autocast ``run.precision`` needs;
- every plug-in reference (``module:function``) imports and names a callable; every blueprint the controller may
  germinate is known (built-in or a user blueprint);
- the profiler can record on this build, when enabled.

A factory is not called here (a data factory may load a data set): one that raises is found when the run is
built, still before anything is written, and is the same exit 3 naming the key.
"""

from __future__ import annotations

import torch.profiler

from esper.core.config import EsperConfig
from esper.core.config.plugins import load_factory
from esper.core.config.trust import references
from esper.core.errors import ConfigError
from esper.core.kasmina import BlueprintRegistry
from esper.core.model import device


def preflight(cfg: EsperConfig) -> None:
    """ConfigError (exit 3) naming the key of the first thing that would stop ``train``."""
    device.check(cfg)  # run.device and run.precision
    for ref in references(cfg):
        if ref.kind == "code":
            load_factory(ref.value, ref.key)
    BlueprintRegistry(cfg.seeds)  # unknown names in seeds.blueprints, clashes with the built-ins
    if cfg.trainer.profiler.enabled and \
            torch.profiler.ProfilerActivity.CPU not in torch.profiler.supported_activities():
        raise ConfigError("trainer.profiler.enabled: this torch build cannot profile the CPU",
                          key="trainer.profiler.enabled")
