"""Outputs are on disk (fsync'd file and directory) before `write_dicom_outputs` returns.

Issue 13.10: the worker commits the export rows right after this call; an output
that was only in the page cache could be an empty file after a power cut, which
the exporter then failed to send for 24 h.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom

import storage.instance_store
from inference.outputs.dicom_outputs import write_dicom_outputs


def test_each_output_and_its_folder_are_fsynced_before_return(tmp_path: Path, geometry_series, result_on, monkeypatch):
    series = geometry_series(
        shape=(4, 30, 30),
        row_spacing=1.0,
        col_spacing=1.0,
        slice_spacing=2.0,
        along_row=(1, 0, 0),
        along_col=(0, 1, 0),
    )
    labels = np.zeros((4, 30, 30), np.uint16)
    labels[1:3, 5:15, 5:15] = 1
    synced: list[tuple[str, int]] = []  # (what the descriptor was, its size then)
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))

    monkeypatch.setattr(storage.instance_store.os, "fsync", recording_fsync)
    out_dir = tmp_path / "out"
    written = write_dicom_outputs(result_on(series, labels), out_dir)

    files = [(path, size) for path, size in synced if path.endswith(".partial")]
    assert len(files) == len(written) == 2
    for output, (_, size) in zip(written, files):  # the bytes synced are the bytes renamed into place
        assert output.path.stat().st_size == size > 0
        assert pydicom.dcmread(output.path).SOPInstanceUID == output.sop_instance_uid
    assert [path for path, _ in synced].count(str(out_dir)) == len(written)  # each rename made durable
