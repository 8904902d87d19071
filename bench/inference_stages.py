"""Inference benchmark: time per stage for one 176-slice 512x512 series, on this machine.

Stages are those `inference.pipeline.run_series` records (load, preprocess
(N4 + z-score + resampling), model, postprocess), plus the model alone in
slices per second and the process's peak resident memory. The N4 share of
the whole is reported because the goal is N4 < 1/4 of `infer`.

    .venv/bin/python bench/inference_stages.py [--matrix 512 --slices 176] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from inference.model.package import default_package_path, load_package
from inference.model.predictor import predict_slices, select_device
from inference.pipeline import run_series
from inference.synthetic.phantoms import generate_phantom, write_phantom_series


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--slices", type=int, default=176)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="infer-bench-"))
    files = write_phantom_series(
        generate_phantom(11, orientation="axial", matrix=args.matrix, slices=args.slices, n_lesions=3), work / "series"
    )
    package = load_package(args.model or default_package_path())
    device = select_device(args.device)

    start = time.perf_counter()
    result = run_series(files, package, device=args.device)
    total = time.perf_counter() - start

    model = package.build_model(device)
    size = package.input_size if hasattr(package, "input_size") else 384
    slices = np.random.default_rng(0).normal(size=(32, size, size)).astype(np.float32)
    predict_slices(model, slices[:8], device=device)  # warm-up
    start = time.perf_counter()
    predict_slices(model, slices, device=device)
    model_alone = time.perf_counter() - start

    report = {
        "series": f"{len(files)} slices {args.matrix}x{args.matrix}",
        "model": package.identity.display,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "total_run_series_s": round(total, 2),
        "stages_s": {k: round(v, 2) for k, v in result.timings_s.items()},
        "model_alone_slices_per_s": round(len(slices) / model_alone, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "lesions_found": len(result.lesions),
    }
    n4 = sum(v for k, v in result.timings_s.items() if "n4" in k.lower())
    if n4:
        report["n4_share_of_total"] = round(n4 / total, 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
