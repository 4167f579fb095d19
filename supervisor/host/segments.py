"""The shared-memory segments of an instance: their random names, recorded in the state
directory (segments.json) before the segments exist, so that a sweep after a killed
supervisor finds them, and unlinks only those that are provably the caller's."""

from __future__ import annotations

import os
import re
import secrets
import stat

from llmsup.protocol.statedir import StateDirError

SHM_DIR = "/dev/shm"
# llmsup-UID-<128 random bits>[-cache]: nothing else is ever swept.
SEGMENT_NAME = re.compile(r"llmsup-(\d+)-[0-9a-f]{32}(-cache)?")


class SegmentRegistry:
    """The segment methods of a StateDir (host/statedir.py): segments.json is its file."""

    def record_segment(self, kind: str, suffix: str = "") -> str:
        """A new segment name: random, not in use, and recorded here before the segment is
        created (exclusively, by the supervisor) so that a sweep finds it if the supervisor
        is killed. Only the supervisor, holding the pidfile lock, calls this."""
        for _ in range(100):
            name = f"llmsup-{os.getuid()}-{secrets.token_hex(16)}{suffix}"
            if not os.path.lexists(f"{SHM_DIR}/{name}"):
                break
        else:
            raise StateDirError(f"no free shared-memory name in {SHM_DIR} after 100 tries")
        segments = self.read_segments()
        segments[name] = kind
        self.write_json(self.segments_file, segments)
        return name

    def read_segments(self) -> dict[str, str]:
        """Recorded segment names (name -> kind), only names of the caller's llmsup form."""
        data = self.read_json(self.segments_file) or {}
        return {
            name: kind
            for name, kind in data.items()
            if isinstance(kind, str) and is_own_segment_name(name)
        }

    def segment(self, kind: str) -> str | None:
        """The newest recorded segment of this kind ("scoreboard", "cache")."""
        names = [name for name, k in self.read_segments().items() if k == kind]
        return names[-1] if names else None

    def sweep_segments(self) -> bool:
        """Unlink the segments recorded here that are still the caller's (left by a killed
        supervisor; call only when none runs) and forget them; True if one was unlinked."""
        swept = [name for name in self.read_segments() if unlink_segment(name)]
        self.segments_file.unlink(missing_ok=True)
        return bool(swept)


def is_own_segment_name(name: str) -> bool:
    match = SEGMENT_NAME.fullmatch(name) if isinstance(name, str) else None
    return match is not None and int(match.group(1)) == os.getuid()


def segment_is_ours(name: str) -> bool:
    """A segment of the caller's llmsup form that is a regular file the caller owns (lstat:
    /dev/shm is sticky, so nobody else can replace a file of ours there)."""
    if not is_own_segment_name(name):
        return False
    try:
        st = os.lstat(f"{SHM_DIR}/{name}")
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()


def unlink_segment(name: str) -> bool:
    """Unlink a segment only if it is provably the caller's; True if it was unlinked."""
    if not segment_is_ours(name):
        return False
    try:
        os.unlink(f"{SHM_DIR}/{name}")
        return True
    except FileNotFoundError:
        return False
