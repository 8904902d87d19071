"""Writer benchmark: RTSTRUCT + SR for many lesions on a 176-slice 512x512 series.

Why: an outside tester saw "write outputs" take 99 s for 321 lesions, because
each lesion's mask was cut out of the whole volume. The goal is 100 lesions in
under 5 s, and time per lesion that does not grow with the lesion count
(ratio of seconds per lesion at N lesions vs 10 lesions, 1.0 = linear; below
1 while the fixed cost, e.g. the SR's 176 image references, still counts).
The writers are single-threaded, so the process's CPU seconds are what the
wall clock shows on an idle machine; both are printed, with the load average,
because the development machine is shared.

The series exists only in memory (headers as the loader builds them, no pixel
data: the writers read only headers and the label map). Lesions are spheres of
4-12 mm diameter (typical metastases) on a regular lattice inside the head, measured by the node's own
`extract_lesions`, so the result is what the pipeline would hand over.

    .venv/bin/python bench/writers.py [--counts 10 100 300] [--matrix 512 --slices 176]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.uid import MRImageStorage

from inference.imaging.postprocess import extract_lesions
from inference.outputs.dicom_outputs import write_dicom_outputs
from inference.result import EgfrCall, EgfrPrediction, InferenceResult, LoadedSeries, ModelIdentity
from inference.uids import new_uid


def in_memory_series(matrix: int, slices: int, spacing: float = 0.5, thickness: float = 1.0) -> LoadedSeries:
    """An axial series' geometry and headers (no pixel data)."""
    image = sitk.Image(matrix, matrix, slices, sitk.sitkFloat32)
    origin = (-matrix * spacing / 2, -matrix * spacing / 2, -slices * thickness / 2)
    image.SetOrigin(origin)
    image.SetSpacing((spacing, spacing, thickness))
    study, series, frame = new_uid(), new_uid(), new_uid()
    datasets = []
    for k in range(slices):
        ds = pydicom.Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, new_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "BENCH^WRITERS", "BENCH1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.Manufacturer = "", "bench"
        ds.Modality, ds.Rows, ds.Columns = "MR", matrix, matrix
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * thickness]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing, spacing]
        datasets.append(ds)
    return LoadedSeries(image=image, datasets=datasets, files=[Path(f"/bench/{k}.dcm") for k in range(slices)])


def result_with_lesions(series: LoadedSeries, count: int) -> InferenceResult:
    """`count` spherical lesions on a lattice inside the volume, measured by `extract_lesions`."""
    size = series.image.GetSize()[::-1]  # (k, rows, cols)
    spacing = np.asarray(series.image.GetSpacing()[::-1])
    zz, yy, xx = np.ogrid[: size[0], : size[1], : size[2]]
    probability = np.zeros(size, np.float32)
    per_axis = int(np.ceil(count ** (1 / 3)))
    centres = [(i, j, m) for i in range(per_axis) for j in range(per_axis) for m in range(per_axis)][:count]
    rng = np.random.default_rng(0)
    for i, j, m in centres:
        centre = [(a + 1) * n / (per_axis + 1) for a, n in zip((i, j, m), size)]
        radius = rng.uniform(2.0, 6.0)
        box = tuple(slice(max(int(c - radius / s) - 1, 0), int(c + radius / s) + 2) for c, s in zip(centre, spacing))
        grid = [zz[box[0]], yy[:, box[1]], xx[:, :, box[2]]]
        distance = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing))
        probability[box] = np.maximum(probability[box], (distance <= radius**2).astype(np.float32))
    image = sitk.GetImageFromArray(probability)
    image.CopyInformation(series.image)
    everywhere = sitk.Cast(image >= -1, sitk.sitkUInt8)  # a synthetic result: the whole volume is "brain"
    label_map, lesions = extract_lesions(image, brain_mask=everywhere, threshold=0.5, min_volume_mm3=20.0)
    if len(lesions) != count:
        raise RuntimeError(f"expected {count} separate lesions, got {len(lesions)}")
    return InferenceResult(
        series=series,
        label_map=label_map,
        probability_map=None,
        lesions=lesions,
        egfr=EgfrPrediction(EgfrCall.MUTANT, 0.7, 3),
        model=ModelIdentity("bench", "0.0.0", True),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 100, 300])
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--slices", type=int, default=176)
    args = parser.parse_args()
    series = in_memory_series(args.matrix, args.slices)
    rows = []
    with tempfile.TemporaryDirectory(prefix="writers-bench-") as work:
        for count in args.counts:
            result = result_with_lesions(series, count)
            start, cpu_start = time.perf_counter(), time.process_time()
            write_dicom_outputs(result, Path(work) / f"n{count}")
            rows.append((count, time.perf_counter() - start, time.process_time() - cpu_start))
    base = rows[0][2] / rows[0][0]
    print(
        f"{args.slices}x{args.matrix}x{args.matrix}, RTSTRUCT + SR written to disk; load average {os.getloadavg()[0]:.1f}"
    )
    print("| lesions | wall s | CPU s | CPU ms per lesion | per-lesion CPU ratio vs first |")
    print("| --- | --- | --- | --- | --- |")
    for count, wall, cpu in rows:
        print(f"| {count} | {wall:.2f} | {cpu:.2f} | {1000 * cpu / count:.1f} | {cpu / count / base:.2f} |")


if __name__ == "__main__":
    main()
