"""Overlay PNG: an RTSTRUCT's contours drawn on the key slices of its series.

Why: a physicist deciding whether to release a held job (`dicom-node jobs
show`) and a demo user checking what the TPS received both need to *see* the
contours. Both draw from the RTSTRUCT file itself, read back with pydicom and
mapped to the series with the independent rasteriser's geometry
(`inference.outputs.rtstruct_raster`), so the picture shows what a TPS imports,
not the node's internal mask.

Decisions: one panel per ROI for the first `max_panels` ROIs (the writer
numbers them by size, largest first), each on the slice where that ROI's
contour area is largest; every ROI with a contour on that slice is drawn, in
its ROI Display Color, so scattered false positives show up around the lesion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom


def overlay_png(
    series_files: list[Path],
    rtstruct_path: Path,
    out_png: Path,
    *,
    caption: str = "contours from the RTSTRUCT as delivered",
    max_panels: int = 4,
) -> Path:
    """Write the key slices of `series_files` with `rtstruct_path`'s contours to `out_png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk

    from inference.imaging.volume_loader import load_series
    from inference.outputs.rtstruct import polygon_area
    from inference.outputs.rtstruct_raster import patient_to_continuous_index

    series = load_series(series_files)
    volume = sitk.GetArrayViewFromImage(series.image)
    rtstruct = pydicom.dcmread(rtstruct_path)
    names = {roi.ROINumber: roi.ROIName for roi in rtstruct.StructureSetROISequence}
    # slice index -> [(contour in (column, row) pixels, colour)] over all ROIs
    on_slice: dict[int, list[tuple[np.ndarray, tuple[float, ...]]]] = {}
    panels: list[tuple[str, int]] = []
    for roi_contour in rtstruct.ROIContourSequence:
        colour = tuple(v / 255 for v in roi_contour.ROIDisplayColor)
        by_slice: dict[int, list[np.ndarray]] = {}
        for contour in getattr(roi_contour, "ContourSequence", []):
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            index = patient_to_continuous_index(points, series)
            k = int(round(index[:, 2].mean()))
            by_slice.setdefault(k, []).append(index[:, :2])
            on_slice.setdefault(k, []).append((index[:, :2], colour))
        if by_slice:
            best = max(by_slice, key=lambda k: sum(abs(polygon_area(c)) for c in by_slice[k]))
            panels.append((names[roi_contour.ReferencedROINumber], best))
    shown = panels[:max_panels] or [("no lesion", volume.shape[0] // 2)]
    figure, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 4.8), squeeze=False)
    for axis, (name, k) in zip(axes[0], shown):
        low, high = np.percentile(volume[k], [1, 99.5])
        axis.imshow(volume[k], cmap="gray", vmin=low, vmax=high)
        for contour, colour in on_slice.get(k, []):
            closed = np.vstack([contour, contour[:1]])
            axis.plot(closed[:, 0], closed[:, 1], color=colour, linewidth=1.2)
        axis.set_title(f"{name} - slice {k + 1}/{volume.shape[0]}", fontsize=10)
        axis.axis("off")
    figure.suptitle(f"{rtstruct.get('StructureSetLabel', '')} - {len(panels)} ROI(s)\n{caption}", fontsize=10)
    figure.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=110)
    plt.close(figure)
    return out_png
