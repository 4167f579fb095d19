"""How the machine's cores are split into worker core groups.

A group is whole physical cores (SMT siblings stay together, since two llama.cpp threads
on one core's siblings compete for the same vector units), taken from the CPUs this
process may run on.
"""

from __future__ import annotations

import os
from pathlib import Path


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
    """CPU lists, one per worker. Defaults: one worker per physical core."""
    cores = physical_cores()
    if cores_per_worker is None:
        cores_per_worker = max(1, len(cores) // workers) if workers else 1
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
