"""Benchmark `pcl-hpc predict`: scans per second, batched whole slices against a per-slice loop.

Both runs go through the same `pcl_hpc.predict.predict` (read, the training preprocessing, the
network, the inverse mapping to each scan's grid, the atomic write); the baseline predicts one slice
per forward pass (``batch=1``), as a plain loop over slices would. The model is an untrained U-Net
with a real model_spec.json (speed does not depend on the weights); the scans are synthetic NIfTI
volumes at a spacing other than the model's, so the in-plane resampling and its inverse run too.

    python tools/bench_predict.py [--scans 4] [--size 192] [--slices 48] [--width 16] [--device auto]

Prints one JSON line: volumes/s of both and the speedup.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from pcl_hpc.config import load_config  # noqa: E402
from pcl_hpc.data.preprocess import volume_settings  # noqa: E402
from pcl_hpc.models.unet import build_unet  # noqa: E402
from pcl_hpc.train.finetune import SPEC_FILE, model_spec  # noqa: E402


def make_model(folder: Path, width: int) -> None:
    cfg = load_config(None, [f"model.width={width}", "finetune.num_classes=3", "data.target_spacing=[1.5, 1.5]"])
    names = ["cortex", "white_matter", "deep_grey"]
    manifest = {"settings": volume_settings(cfg.data, ["background", *names]), "content_hash": "bench"}
    torch.manual_seed(0)
    torch.save(build_unet(cfg.model, 4).state_dict(), folder / "model.pt")
    (folder / SPEC_FILE).write_text(json.dumps(model_spec(cfg, manifest, {"encoder": "random"}, names)))


def make_scans(folder: Path, n: int, size: int, slices: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        img = sitk.GetImageFromArray(rng.normal(100, 20, (slices, size, size)).astype(np.float32))
        img.SetSpacing((1.2, 1.2, 3.0))  # not the model's 1.5 mm: resampled there and back
        sitk.WriteImage(img, str(folder / f"scan{i:02d}.nii.gz"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=4)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--slices", type=int, default=48)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=0, help="slices per forward pass of the batched run (0: predict's default)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args()
    from pcl_hpc.predict import AUTO_BATCH, predict

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    args.batch = args.batch or AUTO_BATCH[device.startswith("cuda")]
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        root = Path(tmp)
        (root / "model").mkdir()
        (root / "scans").mkdir()
        make_model(root / "model", args.width)
        make_scans(root / "scans", args.scans, args.size, args.slices)
        predict(root / "model", [next((root / "scans").iterdir())], root / "warmup", device=device, progress=False)
        rates = {}
        for name, batch in (("batched", args.batch), ("per_slice", 1)):
            summary = predict(root / "model", root / "scans", root / name, device=device, batch=batch, progress=False)
            assert summary.ok and len(summary.written) == args.scans, summary.format()
            rates[name] = args.scans / summary.seconds
    print(json.dumps({"bench": "predict", "device": device, "scans": args.scans,
                      "scan_shape_zhw": [args.slices, args.size, args.size], "width": args.width, "batch": args.batch,
                      "volumes_per_s": round(rates["batched"], 3), "baseline_per_slice_volumes_per_s":
                      round(rates["per_slice"], 3), "speedup": round(rates["batched"] / rates["per_slice"], 2),
                      "threads": torch.get_num_threads(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
