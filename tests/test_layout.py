"""The split of the allowed cores into worker groups (supervisor/host/layout.py)."""

from __future__ import annotations

import pytest

from llmsup.supervisor.host import layout

FOUR = [[0], [1], [2], [3]]
FOUR_SMT = [[0, 4], [1, 5], [2, 6], [3, 7]]  # 2-way SMT: siblings N and N+4
ONE_CORE = [[0]]


@pytest.fixture
def topology(monkeypatch):
    def use(cores: list[list[int]]) -> None:
        monkeypatch.setattr(layout, "physical_cores", lambda: [list(c) for c in cores])

    return use


def test_physical_cores_covers_the_allowed_cpus():
    import os

    cores = layout.physical_cores()
    assert cores and all(cores)
    assert sorted(cpu for core in cores for cpu in core) == sorted(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    "cores, expected",
    [
        (FOUR, [[0, 1], [2, 3]]),
        (FOUR_SMT, [[0, 4, 1, 5], [2, 6, 3, 7]]),  # whole cores: siblings stay together
        (ONE_CORE, [[0]]),  # a smaller machine: all of it to one worker
        ([[0, 1]], [[0, 1]]),
        ([[0], [1], [2]], [[0, 1]]),  # 2 cores per worker: the third is left over
    ],
)
def test_core_groups_default(topology, cores, expected):
    topology(cores)
    assert layout.DEFAULT_CORES_PER_WORKER == 2
    assert layout.core_groups(None, None) == expected


@pytest.mark.parametrize(
    "cores, workers, per_worker, expected",
    [
        # --workers alone: the cores shared out evenly, whole cores each.
        (FOUR, 1, None, [[0, 1, 2, 3]]),
        (FOUR, 2, None, [[0, 1], [2, 3]]),
        (FOUR, 3, None, [[0], [1], [2]]),
        (FOUR, 4, None, [[0], [1], [2], [3]]),
        (FOUR_SMT, 4, None, [[0, 4], [1, 5], [2, 6], [3, 7]]),
        (ONE_CORE, 1, None, [[0]]),
        # --cores-per-worker alone: as many workers as fit.
        (FOUR, None, 1, [[0], [1], [2], [3]]),
        (FOUR, None, 3, [[0, 1, 2]]),
        (FOUR, None, 4, [[0, 1, 2, 3]]),
        (FOUR_SMT, None, 1, [[0, 4], [1, 5], [2, 6], [3, 7]]),
        (ONE_CORE, None, 1, [[0]]),
        # Both.
        (FOUR, 2, 1, [[0], [1]]),
        (FOUR, 1, 2, [[0, 1]]),
        (FOUR, 2, 2, [[0, 1], [2, 3]]),
        (FOUR_SMT, 2, 2, [[0, 4, 1, 5], [2, 6, 3, 7]]),
        (FOUR_SMT, 3, 1, [[0, 4], [1, 5], [2, 6]]),
    ],
)
def test_core_groups_with_flags(topology, cores, workers, per_worker, expected):
    topology(cores)
    groups = layout.core_groups(workers, per_worker)
    assert groups == expected
    flat = [cpu for group in groups for cpu in group]
    assert len(flat) == len(set(flat)), "no CPU in two groups"


@pytest.mark.parametrize(
    "cores, workers, per_worker, message",
    [
        (
            FOUR,
            5,
            None,
            "--workers 5 x --cores-per-worker 1 needs 5 physical cores; this process may use 4",
        ),
        (
            FOUR,
            3,
            2,
            "--workers 3 x --cores-per-worker 2 needs 6 physical cores; this process may use 4",
        ),
        (
            FOUR,
            None,
            5,
            "--workers 1 x --cores-per-worker 5 needs 5 physical cores; this process may use 4",
        ),
        (
            FOUR_SMT,
            5,
            1,
            "--workers 5 x --cores-per-worker 1 needs 5 physical cores; this process may use 4",
        ),  # SMT siblings are not cores
        (
            ONE_CORE,
            2,
            None,
            "--workers 2 x --cores-per-worker 1 needs 2 physical cores; this process may use 1",
        ),
        (
            ONE_CORE,
            None,
            2,
            "--workers 1 x --cores-per-worker 2 needs 2 physical cores; this process may use 1",
        ),
        (FOUR, 0, None, "--workers is 0; it must be at least 1"),
        (FOUR, -1, None, "--workers is -1; it must be at least 1"),
        (FOUR, 0, 1, "--workers is 0; it must be at least 1"),
        (FOUR, None, 0, "--cores-per-worker is 0; it must be at least 1"),
        (FOUR, 2, -1, "--cores-per-worker is -1; it must be at least 1"),
    ],
)
def test_core_groups_errors_name_the_flag(topology, cores, workers, per_worker, message):
    topology(cores)
    with pytest.raises(layout.LayoutError) as info:
        layout.core_groups(workers, per_worker)
    assert str(info.value) == message
