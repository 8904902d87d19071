"""The overlay picture: an RTSTRUCT's contours drawn on key slices of the series they were made on.

Drawn from the RTSTRUCT file (what the TPS imports), never from the node's
internal mask, so the picture shows what was delivered. Used by the demo and
by the job page of the web view.
"""

from __future__ import annotations

from pathlib import Path

import pydicom


def overlay_png(
    series_files: list[Path],
    rtstruct_path: Path,
    out_png: Path,
    *,
    caption: str = "contours from the RTSTRUCT received by the TPS",
    max_panels: int = 4,
) -> Path:
    """Key slices (largest contour of each ROI) with the RTSTRUCT's contours drawn on them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import SimpleITK as sitk

    from inference.imaging.volume_loader import load_series
    from inference.outputs.rtstruct import polygon_area
    from inference.outputs.rtstruct_raster import patient_to_continuous_index

    series = load_series(series_files)
    volume = sitk.GetArrayViewFromImage(series.image)
    rtstruct = pydicom.dcmread(rtstruct_path)
    names = {roi.ROINumber: roi.ROIName for roi in rtstruct.StructureSetROISequence}
    panels: list[tuple[str, int, list[np.ndarray], tuple[float, float, float]]] = []
    for roi_contour in rtstruct.ROIContourSequence:
        by_slice: dict[int, list[np.ndarray]] = {}
        for contour in getattr(roi_contour, "ContourSequence", []):
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            index = patient_to_continuous_index(points, series)
            by_slice.setdefault(int(round(index[:, 2].mean())), []).append(index[:, :2])
        if not by_slice:
            continue
        best = max(by_slice, key=lambda k: sum(abs(polygon_area(c)) for c in by_slice[k]))
        colour = tuple(v / 255 for v in roi_contour.ROIDisplayColor)
        panels.append((names[roi_contour.ReferencedROINumber], best, by_slice[best], colour))
    panels = panels[:max_panels] or [("no lesion", volume.shape[0] // 2, [], (1, 1, 1))]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.8), squeeze=False)
    for axis, (name, k, contours, colour) in zip(axes[0], panels):
        low, high = np.percentile(volume[k], [1, 99.5])
        axis.imshow(volume[k], cmap="gray", vmin=low, vmax=high)
        for contour in contours:
            closed = np.vstack([contour, contour[:1]])
            axis.plot(closed[:, 0], closed[:, 1], color=colour, linewidth=1.5)
        axis.set_title(f"{name} - slice {k + 1}/{volume.shape[0]}", fontsize=10)
        axis.axis("off")
    figure.suptitle(f"{rtstruct.get('StructureSetLabel', '')}\n{caption}", fontsize=10)
    figure.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=110)
    plt.close(figure)
    return out_png
