"""Orthanc (Debian package `orthanc`) as a real PACS for the tests, on free loopback ports.

Why Orthanc: it is a widely deployed PACS nobody here wrote, it speaks C-STORE
in both directions and Storage Commitment, and its REST API shows what it
really holds. Each server gets its own configuration, storage and index in a
temp directory; `stop()` ends the process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from dicom_node.peers import free_port


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc")


class OrthancServer:
    """One Orthanc process; `modalities` maps a name to (AE title, port) on 127.0.0.1."""

    def __init__(self, root: Path, *, ae_title: str = "ORTHANC", modalities: dict[str, tuple[str, int]]) -> None:
        binary = orthanc_binary()
        if binary is None:
            raise RuntimeError("Orthanc not installed (Debian package 'orthanc')")
        root.mkdir(parents=True, exist_ok=True)
        self.ae_title, self.dicom_port, self.http_port = ae_title, free_port(), free_port()
        config = {
            "Name": "dicom-node test PACS",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "index"),
            "DicomAet": ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomScpTimeout": 30,
            "DicomModalities": {name: [aet, "127.0.0.1", port] for name, (aet, port) in modalities.items()},
            "Plugins": [],
            "StableAge": 1,
        }
        (root / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.log = root / "orthanc.log"
        self._process = subprocess.Popen(
            [binary, str(root / "orthanc.json")], stdout=self.log.open("wb"), stderr=subprocess.STDOUT
        )
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {self.log.read_text()[-2000:]}")
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not answer on port {self.http_port}")

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json") -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method, headers={"Content-Type": content_type}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, payload: Any) -> Any:
        return self.request("POST", path, json.dumps(payload).encode())

    def upload(self, files: list[Path]) -> list[str]:
        """Store files through REST (as a modality would have); returns Orthanc instance ids."""
        ids = []
        for path in files:
            answer = self.request("POST", "/instances", path.read_bytes(), "application/dicom")
            ids.append(answer["ID"])
        return ids

    def file(self, instance_id: str) -> bytes:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/instances/{instance_id}/file")
        with urllib.request.urlopen(request, timeout=60) as response:
            data: bytes = response.read()
            return data

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(20)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(10)
