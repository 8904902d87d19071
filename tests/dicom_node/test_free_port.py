"""The loopback ports tests, the demo and benchmarks listen on.

A CI run failed with "Address already in use": a port taken with bind(port 0) comes from
the ephemeral range, where any process's outgoing connection may take it before the
caller binds it. These tests hold free_port to the rules that prevent that class of race.
"""

from __future__ import annotations

import socket
import subprocess
import sys

from dicom_node.peers import _ephemeral_low, free_port


def test_ports_are_distinct_below_the_ephemeral_range_and_bindable():
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= port < _ephemeral_low() for port in ports)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_something_listens_on_is_skipped():
    port = free_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        # Walk round the whole block: the taken port must never be handed out meanwhile.
        assert port not in {free_port() for _ in range(2_000)}


def test_two_processes_get_different_ports():
    pick = [sys.executable, "-c", "from dicom_node.peers import free_port; print(*(free_port() for _ in range(20)))"]
    first, second = (
        set(map(int, subprocess.run(pick, capture_output=True, text=True, check=True).stdout.split())) for _ in range(2)
    )
    assert not first & second
