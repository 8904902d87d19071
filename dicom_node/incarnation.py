"""Which dead process on this host a starting one replaces, so its jobs need not wait for their leases.

Why: after a crash, `serve` (or a `dicom-node worker`) restarts within seconds,
but the jobs its previous incarnation was running would otherwise stay
`running` until their leases expire (`[worker] lease_s`, a minute by default).

Decision: every process that runs workers holds an exclusive `flock` on a slot
file under `<data_dir>/run/<host>/` for its whole life, and writes its identity
(`host:pid:nonce`) into it. The kernel drops the lock when the process dies,
however it dies (SIGKILL included). So a process that obtains a slot's lock
knows that whoever wrote the identity in it is dead, and re-queues that
process's running jobs at once. Nothing else is inferred: a slot that is locked
belongs to a live process, whose jobs are never touched, and the jobs of
processes on other hosts are left to their leases. Slots are numbered
(`slot-0`, `slot-1`, ...) and shared by `serve` and `dicom-node worker`: each
live process holds its own, and a starting one takes the first free slot.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import TextIO

MAX_SLOTS = 64


class Incarnation:
    """This process's slot: the lock held until exit, and who held the slot before."""

    def __init__(self, data_dir: Path, identity: str) -> None:
        self.folder = Path(data_dir) / "run" / socket.gethostname()
        self.identity = identity
        self.slot: Path | None = None
        self.previous: str | None = None
        self._handle: TextIO | None = None

    def claim(self) -> str | None:
        """Take the first free slot; return the identity of its previous holder (dead), if any."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for index in range(MAX_SLOTS):
            path = self.folder / f"slot-{index}"
            handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open until the process exits
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live process holds this slot
                handle.close()
                continue
            handle.seek(0)
            self.previous = handle.read().strip() or None
            handle.seek(0)
            handle.truncate()
            handle.write(self.identity + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            self.slot, self._handle = path, handle
            return self.previous
        return None

    def release(self) -> None:
        """Give the slot up (at a clean stop; a dead process's lock goes by itself)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def live_holders(data_dir: Path) -> list[str]:
    """The identities written in the slots that a live process on this host holds (`store reindex`
    refuses to run beside a node). Each slot is tried with a non-blocking shared lock, released at
    once. Processes on other hosts are not seen (their locks are local to their host)."""
    folder = Path(data_dir) / "run" / socket.gethostname()
    holders = []
    for path in sorted(folder.glob("slot-*")):
        with open(path, encoding="utf-8") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holders.append(handle.read().strip() or path.name)
                continue
            fcntl.flock(handle, fcntl.LOCK_UN)
    return holders
