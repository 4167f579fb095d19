"""Telling a process apart from a later one with the same pid (before signalling it)."""

from __future__ import annotations


def process_identity(pid: int) -> dict:
    """What tells a process apart from a later one with the same pid: its start time in
    clock ticks since boot (/proc/PID/stat field 22) and the boot's id."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        # comm (field 2) may hold spaces and parentheses: fields 3.. follow the last ')'.
        fields = f.read().rsplit(b")", 1)[1].split()
    return {"start_time": int(fields[22 - 3]), "boot_id": boot_id()}


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()
