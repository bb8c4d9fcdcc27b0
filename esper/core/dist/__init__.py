"""Scale out on torch.distributed: the world (rank, size, process group), data-parallel reductions and the
cross-rank checks (parameter layout, lifecycle fingerprint). See README "Scale out"."""

from esper.core.dist.parallel import DataParallel, weights_digest
from esper.core.dist.world import (
    World,
    broadcast,
    check_config,
    current,
    env_world,
    gather,
    joined,
    rank_dir,
    restart_count,
    run_record,
)

__all__ = ["DataParallel", "World", "broadcast", "check_config", "current", "env_world", "gather", "joined",
           "rank_dir", "restart_count", "run_record", "weights_digest"]
