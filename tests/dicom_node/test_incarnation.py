"""Process slots on a real file system: a slot is free only once its holder has exited."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from dicom_node.incarnation import Incarnation, live_holders


def test_live_processes_hold_their_own_slots_and_a_released_slot_names_its_holder(tmp_path):
    first, second = Incarnation(tmp_path, "h:1:aa"), Incarnation(tmp_path, "h:2:bb")
    assert first.claim() is None and second.claim() is None
    assert (first.slot.name, second.slot.name) == ("slot-0", "slot-1")
    first.release()
    third = Incarnation(tmp_path, "h:3:cc")
    assert third.claim() == "h:1:aa" and third.slot == first.slot
    assert third.slot.read_text() == "h:3:cc\n"
    second.release()
    third.release()


def test_a_sigkilled_process_frees_its_slot_and_the_next_one_learns_who_it_was(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from dicom_node.incarnation import Incarnation; "
            f"i = Incarnation({str(tmp_path)!r}, 'h:99:dead'); i.claim(); print('held', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        alive = Incarnation(tmp_path, "h:100:live")
        assert alive.claim() is None and alive.slot.name == "slot-1"  # slot-0 is held by a live process
        alive.release()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        deadline = time.monotonic() + 10
        successor = Incarnation(tmp_path, "h:101:new")
        while (previous := successor.claim()) is None and time.monotonic() < deadline:
            successor.release()
            time.sleep(0.05)
        assert previous == "h:99:dead" and successor.slot.name == "slot-0"
        successor.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


def test_live_holders_names_the_processes_holding_a_slot_and_takes_none(tmp_path):
    """What `store reindex` checks before it runs: held slots only; its look frees the slot again."""
    assert live_holders(tmp_path) == []
    first, second = Incarnation(tmp_path, "h:1:aa"), Incarnation(tmp_path, "h:2:bb")
    first.claim()
    second.claim()
    assert live_holders(tmp_path) == ["h:1:aa", "h:2:bb"]
    first.release()
    assert live_holders(tmp_path) == ["h:2:bb"]  # slot-0 is free, its last holder's name still in it
    third = Incarnation(tmp_path, "h:3:cc")
    assert third.claim() == "h:1:aa" and third.slot == first.slot  # the look left the slot claimable
    second.release()
    third.release()
    assert live_holders(tmp_path) == []
