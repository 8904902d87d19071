"""The TPS-compatibility check: each thing planning systems are known to reject is found, and ours has none."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
from pydicom.dataset import Dataset

from inference.outputs.rtstruct import build_rtstruct
from inference.outputs.tps_compat import check_tps_compatible, tps_problems
from inference.result import InferenceResult, LoadedSeries


@pytest.fixture
def built(geometry_series: Callable[..., LoadedSeries], result_on: Callable[..., InferenceResult]):
    series = geometry_series(
        shape=(6, 40, 50), row_spacing=0.7, col_spacing=1.3, slice_spacing=2.5, along_row=(1, 0, 0), along_col=(0, 1, 0)
    )
    labels = np.zeros((6, 40, 50), np.uint16)
    labels[1:4, 5:25, 5:25] = 1
    labels[2:5, 30:36, 30:40] = 2
    result = result_on(series, labels)
    return build_rtstruct(result), result.series.datasets


def first_contour(ds: Dataset) -> Dataset:
    return ds.ROIContourSequence[0].ContourSequence[0]


def test_the_writers_rtstruct_has_no_problem(built) -> None:
    rtstruct, sources = built
    assert tps_problems(rtstruct, sources) == []
    check_tps_compatible(rtstruct, sources)  # does not raise


def long_ds(ds: Dataset) -> None:
    contour = first_contour(ds)
    data = list(contour.ContourData)
    data[0] = "-123.456789012345"  # 17 characters
    contour.ContourData = data


def long_label(ds: Dataset) -> None:
    ds.StructureSetLabel = "A" * 17


def long_roi_name(ds: Dataset) -> None:
    ds.StructureSetROISequence[0].ROIName = "GTV_" + "X" * 13


def mixed_types(ds: Dataset) -> None:
    ds.RTROIObservationsSequence[1].RTROIInterpretedType = "ORGAN"


def missing_image_reference(ds: Dataset) -> None:
    del first_contour(ds).ContourImageSequence


def foreign_image_reference(ds: Dataset) -> None:
    first_contour(ds).ContourImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.4.5.6.7"


def single_point(ds: Dataset) -> None:
    contour = first_contour(ds)
    contour.ContourData = list(contour.ContourData)[:3]
    contour.NumberOfContourPoints = 1


def other_frame_of_reference(ds: Dataset) -> None:
    ds.StructureSetROISequence[1].ReferencedFrameOfReferenceUID = "1.2.3.999"


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (long_ds, "longer than 16 characters"),
        (long_label, "StructureSetLabel"),
        (long_roi_name, "ROIName"),
        (mixed_types, "RTROIInterpretedType differs"),
        (missing_image_reference, "does not reference its image"),
        (foreign_image_reference, "not in the source series"),
        (single_point, "at least 3"),
        (other_frame_of_reference, "is not the image's"),
    ],
)
def test_each_known_rejection_is_found(built, fault, expected: str) -> None:
    rtstruct, sources = built
    broken = copy.deepcopy(rtstruct)
    fault(broken)
    problems = tps_problems(broken, sources)
    assert any(expected in problem for problem in problems), problems
    with pytest.raises(ValueError, match="refused by planning systems"):
        check_tps_compatible(broken, sources)
