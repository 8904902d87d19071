"""DICOM Segmentation writer: the lesion masks as a BINARY SEG, with highdicom.

DICOM PS3.3 A.51 (Segmentation IOD), C.8.20.2 (Segmentation Image), C.8.20.4
(Segment Description). The voxel-exact companion of the RTSTRUCT for viewers and
research tools that read SEG rather than contours.

Decisions
---------
- One segment per lesion, in lesion order (segment n = ``GTV_n``), category
  "Morphologically abnormal structure", type "Neoplasm, metastatic", algorithm
  type AUTOMATIC with the model as Artificial Intelligence algorithm; each
  segment carries the lesion name as tracking identifier and a new tracking UID.
- Frames on the source slices (plane positions and orientation from the source
  images), empty frames omitted, BINARY (1 bit per pixel).
- Content Description and Series Description carry the same AI-review / demo
  wording as the RTSTRUCT (`inference.outputs.notice`).
- No lesions: a SEG needs at least one segment, so `build_seg` raises and
  `inference.outputs.dicom_outputs` skips it, as for the RTSTRUCT.
"""

from __future__ import annotations

from datetime import datetime

import highdicom as hd
import numpy as np
import SimpleITK as sitk

from inference.outputs.codes import (
    ARTIFICIAL_INTELLIGENCE,
    BRAIN,
    METASTATIC_NEOPLASM,
    MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
)
from inference.outputs.notice import short_label
from inference.result import InferenceResult
from inference.uids import new_uid


def build_seg(
    result: InferenceResult,
    *,
    series_number: int = 903,
    manufacturer: str = "dicom-node",
    timestamp: datetime | None = None,
    series_instance_uid: str | None = None,
    instance_number: int = 1,
) -> hd.seg.Segmentation:
    """Build a BINARY Segmentation with one segment per lesion.

    Parameters
    ----------
    result : inference.result.InferenceResult
        Lesions and the label map on the source grid, with the source headers.
    series_number : int
        Series Number (0020,0011) of the new SEG series, positive.
    manufacturer : str
        Manufacturer (0008,0070) of the Enhanced General Equipment module.
    timestamp : datetime.datetime or None
        Content, Series and Instance Creation date and time; now when None.
    series_instance_uid : str or None
        The output series (`inference.outputs.supersession.output_series_uid`); a new UID when None.
    instance_number : int
        Instance Number: the revision in its output series (a re-run's SEG is the next one).

    Returns
    -------
    highdicom.seg.Segmentation
        The SEG instance (a `pydicom.Dataset` with file meta).

    Raises
    ------
    ValueError
        No lesions, a non-positive series number, a label map that does not match
        the source grid, or a lesion without voxels.
    """
    if not result.lesions:
        raise ValueError("result: no lesions; a Segmentation needs at least one segment")
    if series_number < 1:
        raise ValueError(f"series_number: must be positive, got {series_number}")
    if result.label_map.GetSize() != result.series.image.GetSize():
        raise ValueError("result: label map size does not match the source series")
    labels = sitk.GetArrayViewFromImage(result.label_map)
    present = np.bincount(labels.ravel())
    # One pass over the volume whatever the lesion count: label value -> segment number.
    segment_of = np.zeros(len(present), dtype=np.uint16)
    for number, lesion in enumerate(result.lesions, start=1):
        if not 0 < lesion.label < len(present) or present[lesion.label] == 0:
            raise ValueError(f"result: lesion {lesion.name} (label {lesion.label}) has no voxels")
        segment_of[lesion.label] = number
    segments = segment_of[labels]
    algorithm = hd.AlgorithmIdentificationSequence(
        name=result.model.name, family=ARTIFICIAL_INTELLIGENCE, version=result.model.version
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=lesion.name,
            segmented_property_category=MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
            segmented_property_type=METASTATIC_NEOPLASM,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=new_uid(),
            tracking_id=lesion.name,
            anatomic_regions=[BRAIN],
        )
        for number, lesion in enumerate(result.lesions, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=result.series.datasets,
        pixel_array=segments,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid or new_uid(),
        series_number=series_number,
        sop_instance_uid=new_uid(),
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=result.model.name[:64],
        software_versions=result.model.version[:64],
        device_serial_number="0",
        content_label="GTV",
        content_description=short_label(result.model),
    )
    when = timestamp or datetime.now().astimezone()
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S.%f")
    seg.SpecificCharacterSet = "ISO_IR 192"
    seg.SeriesDescription = short_label(result.model)
    seg.SeriesDate, seg.SeriesTime = date, time
    seg.ContentDate, seg.ContentTime = date, time
    seg.InstanceCreationDate, seg.InstanceCreationTime = date, time
    return seg
