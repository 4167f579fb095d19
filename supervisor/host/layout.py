"""How the machine's cores are split into worker core groups.

A group is whole physical cores (SMT siblings stay together, since two llama.cpp threads
on one core's siblings compete for the same vector units), taken from the CPUs this
process may run on.
"""

from __future__ import annotations

import os
from pathlib import Path

# Two cores per worker: one llama.cpp context with 2 threads decodes 8 sequences in one
# batch at 175 tok/s on our machines, where two 1-thread workers with 4 each reach 148
# (docs/architecture.md "Worker layout" has the figures and when to choose otherwise).
DEFAULT_CORES_PER_WORKER = 2


class LayoutError(Exception):
    pass


def physical_cores() -> list[list[int]]:
    """Allowed CPUs grouped by physical core, in CPU order."""
    allowed = sorted(os.sched_getaffinity(0))
    cores: dict[str, list[int]] = {}
    for cpu in allowed:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            key = siblings.read_text().strip()
        except OSError:
            key = str(cpu)
        cores.setdefault(key, []).append(cpu)
    return list(cores.values())


def core_groups(workers: int | None, cores_per_worker: int | None) -> list[list[int]]:
    """CPU lists, one per worker. Defaults: DEFAULT_CORES_PER_WORKER cores per worker
    (all of them on a smaller machine), as many workers as that makes."""
    cores = physical_cores()
    if cores_per_worker is None:
        if workers:
            cores_per_worker = max(1, len(cores) // workers)
        else:
            cores_per_worker = max(1, min(DEFAULT_CORES_PER_WORKER, len(cores)))
    if cores_per_worker < 1:
        raise LayoutError(f"--cores-per-worker is {cores_per_worker}; it must be at least 1")
    if workers is None:
        workers = max(1, len(cores) // cores_per_worker)
    if workers < 1:
        raise LayoutError(f"--workers is {workers}; it must be at least 1")
    if workers * cores_per_worker > len(cores):
        raise LayoutError(
            f"--workers {workers} x --cores-per-worker {cores_per_worker} needs "
            f"{workers * cores_per_worker} physical cores; this process may use {len(cores)}"
        )
    return [
        [cpu for core in cores[i * cores_per_worker : (i + 1) * cores_per_worker] for cpu in core]
        for i in range(workers)
    ]
