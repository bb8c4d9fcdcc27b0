"""Runs one measured child and reports the child's own peak RSS: ``python -m esper.app.bench.launcher ARGV_JSON``.

Measuring from the bench's process would be wrong: a child forked from it starts its ``ru_maxrss`` at the RSS of
the (large) process that forked it. Standard library only, so the launcher itself weighs nothing.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def main() -> None:
    argv = json.loads(sys.argv[1])
    t0 = time.perf_counter()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          check=False)
    wall = time.perf_counter() - t0
    sys.stderr.write(proc.stderr.decode(errors="replace")[-2000:])
    print(json.dumps({"returncode": proc.returncode, "wall_s": wall,
                      "maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))


if __name__ == "__main__":
    main()
