"""Fixtures for the DICOM writer tests: small real DICOM series and results on them.

Series are written as real MR files and read back with SimpleITK's own DICOM
reader (GDCM) for the geometry and pydicom for the headers, so the writers'
header maths is checked against an independent implementation. Phantom series
are loaded with the node's own `inference.imaging.volume_loader.load_series`, as in
production. Tests get the
helpers as fixtures (`geometry_files`, `geometry_series`, `phantom_case`, `result_on`, `dciodvfy`), so
they work whether or not the test folders are packages.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

from inference.imaging.volume_loader import load_series
from inference.result import (
    EgfrCall,
    EgfrPrediction,
    InferenceResult,
    Lesion,
    LoadedSeries,
    ModelIdentity,
)
from inference.uids import new_uid
from tests.helpers.dciodvfy import dciodvfy_messages

DEMO_MODEL = ModelIdentity(name="mtsa-demo", version="0.1.0", is_demo=True)
CLINICAL_MODEL = ModelIdentity(name="mtsa-net", version="2.3.1", is_demo=False)


def write_geometry_series(
    out_dir: Path,
    *,
    shape: tuple[int, int, int],
    row_spacing: float,
    col_spacing: float,
    slice_spacing: float,
    along_row: Sequence[float],
    along_col: Sequence[float],
    origin: Sequence[float] = (-40.0, -30.0, -20.0),
    patient_name: str = "TEST^PATIENT",
    character_set: str = "ISO_IR 100",
    position_jitter_mm: float = 0.0,
) -> list[Path]:
    """Write a blank MR series (k, rows, cols), slices stacked along row x col.

    `position_jitter_mm` moves odd slices along the normal by that much, even
    slices back by it (the rounding noise of real scanners' positions).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    along_row, along_col = np.asarray(along_row, float), np.asarray(along_col, float)
    normal = np.cross(along_row, along_col)
    study, series, frame = new_uid(), new_uid(), new_uid()
    slices, rows, cols = shape
    paths = []
    for k in range(slices):
        ds = pydicom.Dataset()
        ds.SpecificCharacterSet = character_set
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = new_uid()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PatientName, ds.PatientID = patient_name, "PID-1"
        ds.PatientBirthDate, ds.PatientSex = "19600101", "F"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame, ""
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20260102", "101500", "7"
        ds.AccessionNumber, ds.ReferringPhysicianName = "ACC1", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 3, k + 1
        ds.Manufacturer = "test"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "GR", "SP", ""
        ds.MRAcquisitionType = "3D"
        ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = "3", "8", 1
        offset = k * slice_spacing + (position_jitter_mm if k % 2 else -position_jitter_mm)
        position = np.asarray(origin, float) + offset * normal
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*along_row, *along_col)]
        ds.PixelSpacing = [f"{row_spacing:g}", f"{col_spacing:g}"]
        ds.SliceThickness = f"{slice_spacing:g}"
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.zeros((rows, cols), np.uint16).tobytes()
        path = out_dir / f"IM_{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def read_series(paths: Sequence[Path]) -> LoadedSeries:
    """LoadedSeries with SimpleITK/GDCM geometry and pydicom headers, in file order."""
    image = sitk.Cast(sitk.ReadImage([str(p) for p in paths]), sitk.sitkFloat32)
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    return LoadedSeries(image=image, datasets=datasets, files=list(paths))


def make_result(
    series: LoadedSeries,
    labels: np.ndarray,
    *,
    model: ModelIdentity = DEMO_MODEL,
    egfr: EgfrPrediction | None = None,
) -> InferenceResult:
    """An InferenceResult whose lesions are the labels of `labels` (k, rows, cols), by size."""
    image = series.image
    spacing = np.asarray(image.GetSpacing())
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    present = [int(v) for v in np.unique(labels) if v]
    present.sort(key=lambda v: -int((labels == v).sum()))
    lesions = []
    for rank, value in enumerate(present, start=1):
        ijk = np.argwhere(labels == value)[:, ::-1]
        points = np.asarray(image.GetOrigin()) + (ijk * spacing) @ direction.T
        lesions.append(
            Lesion(
                label=value,
                name=f"GTV_{rank}",
                voxel_count=len(ijk),
                volume_cm3=len(ijk) * float(np.prod(spacing)) / 1000.0,
                max_diameter_mm=_max_diameter(points),
                centroid_mm=tuple(float(v) for v in points.mean(axis=0)),
            )
        )
    label_map = sitk.GetImageFromArray(labels.astype(np.uint16))
    label_map.CopyInformation(series.image)
    if egfr is None:
        egfr = (
            EgfrPrediction(EgfrCall.MUTANT, 0.8125, 3) if lesions else EgfrPrediction(EgfrCall.NOT_ASSESSABLE, None, 0)
        )
    return InferenceResult(
        series=series,
        label_map=label_map,
        probability_map=None,
        lesions=lesions,
        egfr=egfr,
        model=model,
    )


def _max_diameter(points: np.ndarray) -> float:
    """Largest distance between two voxel centres (on the convex hull when there is one)."""
    if len(points) < 2:
        return 0.0
    try:
        points = points[ConvexHull(points).vertices]
    except QhullError:  # flat or tiny lesion: all points
        pass
    return float(pdist(points).max())


@pytest.fixture
def geometry_files(tmp_path: Path) -> Callable[..., list[Path]]:
    """Factory: `write_geometry_series` into a fresh folder."""
    folders = itertools.count()

    def make(**kwargs) -> list[Path]:
        return write_geometry_series(tmp_path / f"mr{next(folders)}", **kwargs)

    return make


@pytest.fixture
def geometry_series(geometry_files: Callable[..., list[Path]]) -> Callable[..., LoadedSeries]:
    """Factory: `write_geometry_series` into a fresh folder, then `read_series` (GDCM geometry)."""

    def make(**kwargs) -> LoadedSeries:
        return read_series(geometry_files(**kwargs))

    return make


@pytest.fixture
def phantom_case(phantom_series) -> Callable[..., tuple[LoadedSeries, np.ndarray]]:
    """Factory: a synthetic phantom written as DICOM (`phantom_series`) and loaded, with its true label map."""

    def make(seed: int, **kwargs) -> tuple[LoadedSeries, np.ndarray]:
        made = phantom_series(seed, **kwargs)
        return load_series(made.files), sitk.GetArrayFromImage(made.phantom.mask)

    return make


@pytest.fixture
def result_on() -> Callable[..., InferenceResult]:
    """`make_result` as a fixture."""
    return make_result


@pytest.fixture
def dciodvfy() -> Callable[[Path], tuple[list[str], list[str]]]:
    """`dciodvfy_messages` as a fixture (skips the test when dciodvfy is absent)."""
    return dciodvfy_messages
