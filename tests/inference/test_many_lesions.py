"""Writers with many lesions: the batched contour simplification and a 150-ROI RTSTRUCT read back.

The writers were made linear in the number of lesions (`bench/writers.py` has the
figures); these tests check that the faster paths still write exactly the masks.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from skimage.measure import find_contours

from inference.outputs.dicom_outputs import write_dicom_outputs
from inference.outputs.rtstruct import simplify_polylines
from inference.outputs.rtstruct_raster import rasterise_roi


def distance_to_polyline(points: np.ndarray, polyline: np.ndarray) -> np.ndarray:
    """Distance of each point to the nearest segment of `polyline` (closed or open as given)."""
    a, b = polyline[:-1], polyline[1:]
    ab = b - a
    t = np.clip(np.einsum("pkj,kj->pk", points[:, None] - a, ab) / np.maximum((ab**2).sum(1), 1e-12), 0, 1)
    nearest = a + t[..., None] * ab
    return np.sqrt(((points[:, None] - nearest) ** 2).sum(-1)).min(1)


def test_batched_douglas_peucker_keeps_ends_tolerance_and_independence():
    rng = np.random.default_rng(3)
    masks = [np.pad(rng.random((20, 20)) < 0.6, 1) for _ in range(15)]
    lines = [line for m in masks for line in find_contours(m.astype(float), 0.5, fully_connected="low")]
    batched = simplify_polylines(lines, 0.25)
    assert [len(b) for b in batched] == [len(simplify_polylines([line], 0.25)[0]) for line in lines]
    for line, simple in zip(lines, batched):
        assert np.array_equal(simple[0], line[0]) and np.array_equal(simple[-1], line[-1])
        assert len(simple) <= len(line)
        assert distance_to_polyline(line, simple).max() <= 0.25 + 1e-9
    assert simplify_polylines(lines[:2], 0.0) == lines[:2]


@pytest.mark.slow
def test_150_lesions_become_150_rois_that_rasterise_to_their_masks(geometry_series, result_on, tmp_path):
    series = geometry_series(
        shape=(12, 96, 96),
        row_spacing=1.0,
        col_spacing=1.0,
        slice_spacing=2.0,
        along_row=(1, 0, 0),
        along_col=(0, 1, 0),
    )
    labels = np.zeros((12, 96, 96), np.uint16)
    rng = np.random.default_rng(5)
    for n in range(150):  # 2x2x(1-2) blocks on a lattice, none touching
        k, r, c = 3 * (n // 100), 6 * ((n // 10) % 10) + 3, 6 * (n % 10) + 30
        labels[k : k + rng.integers(1, 3), r : r + 2, c : c + 2] = n + 1
    result = result_on(series, labels)
    written = write_dicom_outputs(result, tmp_path)
    rtstruct = pydicom.dcmread(next(w.path for w in written if w.kind == "RTSTRUCT"))
    assert len(rtstruct.StructureSetROISequence) == 150
    for number, lesion in enumerate(result.lesions, start=1):
        assert np.array_equal(rasterise_roi(rtstruct, number, series), result.lesion_mask(lesion)), lesion.name
    sr = pydicom.dcmread(next(w.path for w in written if w.kind == "SR"))
    names = [
        item.TextValue
        for group in sr.ContentSequence
        if group.ConceptNameCodeSequence[0].CodeValue == "126010"
        for measurement in group.ContentSequence
        for item in measurement.ContentSequence
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "112039"
    ]
    assert names == [lesion.name for lesion in result.lesions] + ["EGFR (patient level)"]
