"""`pcl-hpc export`: a fine-tuned model as TorchScript or ONNX, with its preprocessing spec beside it.

``export(model, fmt, out)`` writes ``<out>/model.torchscript.pt`` (``torch.jit.trace``; load
with ``torch.jit.load``) or ``<out>/model.onnx`` (opset 17, dynamic batch, height and width), and
``<out>/model_spec.json``: the model's spec (preprocessing, classes, lineage) with an ``export``
section naming the exported file(s) (``formats``: both can share a folder when they come from
the same weights), the input and the output, and where the model came from (``source``).
The network takes ``image`` (N, C, H, W) float32 slices preprocessed as the spec says, H and W
multiples of 16 (pad, then crop the output), and returns ``logits`` (N, num_classes + 1, H, W).
The ONNX file comes from the TorchScript-based exporter (``dynamo=False``: no onnxscript needed).
Each export is run once on a test batch of another shape and compared with PyTorch before it is kept.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from pcl_hpc.atomic import atomic_path, write_text
from pcl_hpc.errors import UserError
from pcl_hpc.models.unet import build_from_spec
from pcl_hpc.tracking.models import SEG_SPEC_FILE, open_segmentation_model

EXPORT_FORMATS = ("torchscript", "onnx")
EXPORT_FILES = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx"}
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "image", "logits"
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}  # exported vs PyTorch logits, fp32 on CPU


def _check_close(expected: torch.Tensor, got: torch.Tensor, what: str) -> None:
    if got.shape != expected.shape or not torch.allclose(got, expected, **TOLERANCE):
        diff = (got - expected).abs().max().item() if got.shape == expected.shape else float("nan")
        raise UserError(f"export: the {what} export does not reproduce PyTorch's logits (shape {tuple(got.shape)} vs "
                        f"{tuple(expected.shape)}, max difference {diff:.3g}); please report this")


def _torchscript(net: torch.nn.Module, example: torch.Tensor, check: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the input checks are constant for a trace
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript; it still works
        traced = torch.jit.trace(net, (example,), check_trace=False)
        with torch.no_grad():
            _check_close(net(check), traced(check), "TorchScript")
        with atomic_path(path) as tmp:
            torch.jit.save(traced, str(tmp))
        with torch.no_grad():
            _check_close(net(check), torch.jit.load(str(path), map_location="cpu")(check), "TorchScript")


def _onnx(net: torch.nn.Module, example: torch.Tensor, check: torch.Tensor, path: Path) -> None:
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise UserError("export --format onnx needs the onnx package: pip install onnx onnxruntime") from None
    axes = {0: "batch", 2: "height", 3: "width"}
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter: no onnxscript needed
            torch.onnx.export(net, (example,), str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes}, do_constant_folding=True)
        onnx.checker.check_model(str(tmp))
        try:
            import onnxruntime as ort
        except ImportError:
            ort = None  # no runtime to compare with: the checked graph is kept
        if ort is not None:
            session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: check.numpy()})[0])
            with torch.no_grad():
                _check_close(net(check), got, "ONNX")


def _earlier_exports(spec_path: Path, sha256: str | None, out_dir: Path) -> dict[str, dict]:
    """The formats already exported into ``out_dir`` from the same weights (kept side by side)."""
    if not spec_path.is_file():
        return {}
    try:
        old = json.loads(spec_path.read_text(encoding="utf-8"))
        formats = dict(old["export"]["formats"])
        same = old["export"]["source"].get("sha256") == sha256
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"export: {spec_path} is not an export's spec; pass an empty folder as --out") from None
    if not same:
        raise UserError(f"export: {out_dir} holds an export of another model; pass an empty folder as --out")
    return {f: v for f, v in formats.items() if f in EXPORT_FILES and (out_dir / EXPORT_FILES[f]).is_file()}


def export(model: str | Path, fmt: str, out: str | Path, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """Export the model of ``model`` (fine-tuning folder, model.pt or models:/...) as ``fmt``
    (``torchscript`` | ``onnx``) into the folder ``out``; returns ``{"model": path, "spec": path}``.
    ``tracking_uri``: the registry for models:/ sources (default: the process's / $MLFLOW_TRACKING_URI)."""
    fmt = str(fmt).lower()
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"export: format {fmt!r} is not known; valid: {', '.join(EXPORT_FORMATS)}")
    out_dir = Path(out).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"export: --out {out_dir} is a file; pass a folder")
    seg = open_segmentation_model(model, tracking_uri)
    try:
        net = build_from_spec(seg.spec, seg.state).float()
    except ValueError as err:
        raise UserError(f"export: {model}: the weights do not fit the network in model_spec.json ({err}); the two "
                        "files must come from the same fine-tuning") from None
    channels = int(seg.spec["model"].get("in_channels", 1))
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, channels, 64, 64, generator=generator)
    check = torch.randn(3, channels, 48, 80, generator=generator)  # another batch, height and width
    _earlier_exports(out_dir / SEG_SPEC_FILE, seg.lineage.get("sha256"), out_dir)  # before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / EXPORT_FILES[fmt]
    (_torchscript if fmt == "torchscript" else _onnx)(net, example, check, path)
    spec_path = out_dir / SEG_SPEC_FILE
    formats = _earlier_exports(spec_path, seg.lineage.get("sha256"), out_dir)
    formats[fmt] = {"file": path.name, **({"opset": ONNX_OPSET} if fmt == "onnx" else {})}
    spec = {**{k: v for k, v in seg.spec.items() if k != "weights"}, "export": {
        "formats": dict(sorted(formats.items())), "torch": torch.__version__.split("+")[0],
        "input": {"name": INPUT_NAME, "shape": ["batch", channels, "height", "width"], "dtype": "float32",
                  "note": "slices preprocessed as 'preprocessing' says; height and width multiples of 16 (pad, "
                          "then crop the output)"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", int(seg.spec["num_classes"]) + 1, "height", "width"],
                   "note": "class logits, background first (class_names); argmax over axis 1"},
        "source": seg.lineage}}
    write_text(spec_path, json.dumps(spec, indent=1))
    return {"model": path, "spec": spec_path}

