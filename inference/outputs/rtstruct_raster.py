"""Rasterise RTSTRUCT contours back onto a source grid, the way a TPS does.

An independent reader of `inference.outputs.rtstruct`'s output, used by the tests and
by the demo's overlay image. It deliberately shares no geometry code with the
writer: patient coordinates are mapped to voxel indices through the SimpleITK
geometry of the loaded series (origin, spacing, direction matrix, built by the
volume loader), not through the per-slice header maths the writer uses.

Decisions
---------
- A contour belongs to the slice whose plane it lies on (continuous slice index
  within `plane_tolerance` slices of an integer, default a quarter slice: real
  slice positions jitter around the volume's regular grid by up to the loader's
  max(1 % of the spacing, 0.1 mm)); Contour Image Sequence is not trusted, as
  many TPSs do not trust it either.
- Each CLOSED_PLANAR contour is filled by pixel-centre sampling
  (`skimage.draw.polygon`) and the contours of one ROI on one slice are combined
  by the even-odd (XOR) rule (DICOM PS3.3 C.8.8.6.3), so holes and islands
  inside holes come out right.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from skimage.draw import polygon

from inference.outputs.rtstruct import ContourGeometricType
from inference.result import LoadedSeries


def patient_to_continuous_index(points: np.ndarray, reference_series: LoadedSeries) -> np.ndarray:
    """(n, 3) patient coordinates (mm) -> (n, 3) continuous (x, y, k) indices.

    Inverse of the ITK geometry ``P = O + D @ (S * i)`` of `reference_series.image`
    (D the direction matrix, S the spacing); D is orthonormal for DICOM volumes.
    """
    image = reference_series.image
    origin = np.asarray(image.GetOrigin(), dtype=float)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    return np.linalg.solve(direction, (points - origin).T).T / spacing


def rasterise_roi(
    rtstruct: Dataset,
    roi_number: int,
    reference_series: LoadedSeries,
    *,
    plane_tolerance: float = 0.25,
) -> np.ndarray:
    """Fill one ROI of an RT Structure Set on the grid of its source series.

    Parameters
    ----------
    rtstruct : pydicom.dataset.Dataset
        RT Structure Set (PS3.3 A.19) whose contours lie on the series' slices.
    roi_number : int
        ROI Number (3006,0022) of the ROI to fill.
    reference_series : inference.result.LoadedSeries
        The source series; its image defines the grid.
    plane_tolerance : float
        Largest distance of a contour point from its slice plane, in slices.

    Returns
    -------
    numpy.ndarray
        Boolean array (k, rows, columns).

    Raises
    ------
    ValueError
        Unknown ROI number, a contour that is not CLOSED_PLANAR, not planar or
        not on a slice of the series.
    """
    columns, rows, slices = reference_series.image.GetSize()
    mask = np.zeros((slices, rows, columns), dtype=bool)
    for contour in _roi_contours(rtstruct, roi_number):
        if contour.ContourGeometricType != ContourGeometricType.CLOSED_PLANAR.value:
            raise ValueError(f"rtstruct: ROI {roi_number} has a {contour.ContourGeometricType} contour")
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        index = patient_to_continuous_index(points, reference_series)
        k = int(np.rint(index[0, 2]))
        if not 0 <= k < slices or np.abs(index[:, 2] - k).max() > plane_tolerance:
            raise ValueError(f"rtstruct: a contour of ROI {roi_number} does not lie on a slice of the series")
        filled = np.zeros((rows, columns), dtype=bool)
        rr, cc = polygon(index[:, 1], index[:, 0], shape=(rows, columns))
        filled[rr, cc] = True
        mask[k] ^= filled
    return mask


def _roi_contours(rtstruct: Dataset, roi_number: int) -> list[Dataset]:
    """The Contour Sequence items of one ROI (empty when it has none)."""
    for item in getattr(rtstruct, "ROIContourSequence", []):
        if int(item.ReferencedROINumber) == roi_number:
            return list(getattr(item, "ContourSequence", []))
    raise ValueError(f"roi_number: {roi_number} is not in the ROI Contour Sequence")
