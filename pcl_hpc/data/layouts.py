"""Where the volumes are in ``raw_dir``: one adapter per layout, each returning conversion jobs.

A job is one source (a file or a DICOM series folder) with its optional label; it yields one
volume, or one per time frame of a 4D source. Adapters only look at names and, for 4D sources,
at headers; they never read pixels. Problems found here (a label without an image, duplicate
case ids, an id that cannot be a store key, a missing channel) are returned as ``(path, reason)``
lines.

=========  ==============================================================================
generic    MSD / nnU-Net: imagesTr/<case>[_0000].ext + labelsTr/<case>.ext, imagesTs/ unlabeled;
           class names from dataset.json when present. A case may also be a DICOM series
           folder (imagesTr/<case>/). Multi-channel cases give ONE volume <case> from channel
           data.channel (0-based; the U-Net takes one input channel): nnU-Net's <case>_0000,
           _0001, ... files, or a 4D image whose 4th axis holds channels: every 4D image when
           dataset.json declares several ('modality' / 'channel_names', e.g. Task01
           BrainTumour), else one with a 3D label. Other 4D images are split into time frames
           <case>_frameNN (1-based).
images     a plain folder of images or DICOM series folders, no labels (pretraining only)
acdc       patientXXX/ with Info.cfg (ED, ES), patientXXX_frameNN[_gt].nii.gz (labeled ED/ES)
           and patientXXX_4d.nii.gz: every other cine frame becomes an unlabeled volume
chd        ct_XXXX_image.nii.gz + ct_XXXX_label.nii.gz; label values > 7 become 0
mmwhs      ct_train_XXXX_image / _label (also mr_, ct_test_ unlabeled); labels
           205/420/500/550/600/820/850 -> 1..7 (and 421 -> 2, see LABEL_MAPS), any other
           non-zero value is an error
hvsmr      HVSMR 2016: <name>_patN.nii.gz, label <name>_patN-label.nii.gz (anywhere below raw_dir,
           e.g. Ground_truth/); 0 background, 1 myocardium, 2 blood pool
=========  ==============================================================================
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from pcl_hpc.data import store as zstore
from pcl_hpc.errors import UserError

EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
LAYOUTS = ("generic", "images", "acdc", "chd", "mmwhs", "hvsmr")

CLASS_NAMES = {
    "acdc": ["background", "right_ventricle", "myocardium", "left_ventricle"],
    "chd": ["background", "left_ventricle", "right_ventricle", "left_atrium", "right_atrium", "myocardium",
            "aorta", "pulmonary_artery"],
    "mmwhs": ["background", "myocardium", "left_atrium", "left_ventricle", "right_atrium", "right_ventricle",
              "ascending_aorta", "pulmonary_artery"],
    "hvsmr": ["background", "myocardium", "blood_pool"],
}
# Raw label value -> class id, applied before any check; values not listed must already be valid ids.
LABEL_MAPS = {
    # 421 is an annotation artifact in some MMWHS CT/MR label files: left-atrium voxels saved one
    # off from 420, so they are the left atrium too (rejecting them would drop those cases).
    "mmwhs": {205: 1, 420: 2, 421: 2, 500: 3, 550: 4, 600: 5, 820: 6, 850: 7},
}
# Values above this become background (the dataset's published convention).
LABEL_ABOVE_TO_ZERO = {"chd": 7}


@dataclass
class Job:
    image: str  # a file, or a folder holding one DICOM series
    label: str | None = None
    expect_label: bool = False  # a missing label is an error
    outputs: list[tuple[str, int | None]] = field(default_factory=list)  # (volume id, 4th-axis index or None)
    label_frames: bool = False  # the label is 4D too: frame t of the label goes with frame t of the image
    channels_axis: bool = False  # the 4th axis holds channels (MSD), not frames: an output's index is a channel
    channel: int | None = None  # the channel taken from a multi-channel case (4th axis or _000k file), else None

    @property
    def vids(self) -> list[str]:
        return [vid for vid, _ in self.outputs]


def split_ext(name: str) -> tuple[str, str] | None:
    lower = name.lower()
    for ext in EXTENSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)], ext
    return None


def is_dicom_dir(path: Path) -> bool:
    """A folder of files with no image extension (DICOM series are often extension-less)."""
    if not path.is_dir() or path.name.startswith("."):
        return False
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    return bool(files) and not any(split_ext(p.name) for p in files)


def _sources(folder: Path) -> list[tuple[str, Path]]:
    """``(stem, path)`` of image files and DICOM series folders directly in ``folder``."""
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file():
            split = split_ext(p.name)
            if split:
                out.append((split[0], p))
        elif is_dicom_dir(p):
            out.append((p.name, p))
    return out


def frame_count(path: str | Path) -> int:
    """Number of time frames of a 4D file (1 for 3D or anything whose header cannot be read)."""
    path = Path(path)
    if path.is_dir():
        return 1
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
    except RuntimeError:
        return 1  # the conversion reports what is wrong with the file
    size = reader.GetSize()
    return int(size[3]) if len(size) == 4 and size[3] > 1 else 1


def _frames(job: Job, case: str) -> Job:
    """3D: one output named ``case``; 4D: one per frame, ``case_frameNN`` (1-based)."""
    n = frame_count(job.image)
    if n == 1:
        job.outputs = [(case, None)]
    else:
        job.outputs = [(f"{case}_frame{t + 1:02d}", t) for t in range(n)]
        job.label_frames = job.label is not None
    return job


def _channels(job: Job, case: str, channel: int, problems: list,
              declared: tuple[int, str] | None = None) -> Job | None:
    """A 4D image holds channels (modalities), not frames, when dataset.json ``declared`` several
    (``(count, key)``), or else when its label is 3D (MSD): take ``channel``."""
    n = frame_count(job.image)
    if n == 1:
        return _frames(job, case)
    if declared:
        count, key = declared
        if n != count:
            problems.append((job.image, (f"image has {n} entries in its 4th axis but dataset.json '{key}' declares "
                                         f"{count} channels; give this image those {count} channels in order, or "
                                         f"fix '{key}' in dataset.json")))
            return None
        why = f"dataset.json '{key}' declares {count}"
    elif job.label is None or frame_count(job.label) != 1:
        return _frames(job, case)
    else:
        why = "its label is 3D"
    if channel >= n:
        problems.append((job.image, (f"image has {n} channels in its 4th axis ({why}), no channel "
                                     f"{channel}; set data.channel to 0..{n - 1}")))
        return None
    job.outputs, job.channels_axis, job.channel = [(case, channel)], True, channel
    return job


def _generic(raw: Path, problems: list, channel: int = 0) -> list[Job]:
    """nnU-Net channel files ``<case>_0000, _0001, ...`` are one case (a lone ``_0000`` too); a
    ``_NNNN`` suffix without a ``_0000`` sibling is part of the name (``scan_0012``)."""
    declared = declared_channels(raw)
    declared = declared if declared and declared[0] > 1 else None  # one channel: 4D may be time frames
    jobs, no_channel = [], set()
    for sub in ("imagesTr", "imagesTs"):
        files = _sources(raw / sub)
        stems = {stem for stem, _ in files}
        labeled = sub == "imagesTr"
        cases: dict[str, list[tuple[int, Path]]] = {}  # case -> (channel, or -1 for no suffix; file)
        for stem, path in files:
            m = re.match(r"^(.*)_(\d{4})$", stem)  # nnU-Net channel suffix
            if m and f"{m.group(1)}_0000" in stems:
                cases.setdefault(m.group(1), []).append((int(m.group(2)), path))
            else:
                cases.setdefault(stem, []).append((-1, path))
        for case, members in cases.items():
            if len(members) == 1 or any(k < 0 for k, _ in members):
                # one file per case (a plain <name> beside <name>_0000 is a duplicate id for discover())
                jobs += [(case, Job(str(path), expect_label=labeled)) for _, path in members]
                continue
            picked = [path for k, path in members if k == channel]  # several channel files: take one
            if picked:
                jobs.append((case, Job(str(picked[0]), expect_label=labeled, channel=channel)))
            else:
                (lo, first), hi = min(members), max(members)[0]
                problems.append((str(first), (f"case {case!r} has {len(members)} channel files "
                                              f"(_{lo:04d}.._{hi:04d}), none for data.channel={channel}; "
                                              f"set data.channel to one of them or add {case}_{channel:04d}")))
                if labeled:
                    no_channel.add(case)  # its label is not "without an image"
    labels = {stem: path for stem, path in _sources(raw / "labelsTr") if stem not in no_channel}
    for case, job in jobs:
        if job.expect_label and case in labels:
            job.label = str(labels.pop(case))
    for stem, path in labels.items():
        problems.append((str(path), f"label without an image; add imagesTr/{stem}.nii.gz (or _0000) or remove the label"))
    out = []
    for case, job in jobs:
        if job.channel is not None:  # the picked _000k file is one channel: 4D means time frames
            out.append(_frames(job, case))
        elif (done := _channels(job, case, channel, problems, declared)) is not None:
            out.append(done)
    return out


def _images(raw: Path, problems: list) -> list[Job]:
    return [_frames(Job(str(path)), stem) for stem, path in _sources(raw)]


def _read_info_cfg(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(errors="replace").splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            out[key.strip()] = value.strip()
    return out


def _acdc(raw: Path, problems: list) -> list[Job]:
    jobs = []
    folders = sorted(p for p in raw.rglob("patient*") if p.is_dir() and re.fullmatch(r"patient\d+", p.name))
    for folder in folders:
        pid = folder.name
        info = folder / "Info.cfg"
        labeled_frames: set[int] = set()
        if info.is_file():
            cfg = _read_info_cfg(info)
            try:
                labeled_frames = {int(cfg["ED"]), int(cfg["ES"])}
            except (KeyError, ValueError):
                problems.append((str(info), "Info.cfg has no integer 'ED:' and 'ES:' lines; restore it from the ACDC download"))
        for t in sorted(labeled_frames):
            image = folder / f"{pid}_frame{t:02d}.nii.gz"
            label = folder / f"{pid}_frame{t:02d}_gt.nii.gz"
            if not image.is_file():
                problems.append((str(image), f"Info.cfg names frame {t} but this file is missing; restore it or fix Info.cfg"))
                continue
            jobs.append(Job(str(image), str(label) if label.is_file() else None, expect_label=True,
                            outputs=[(f"{pid}_frame{t:02d}", None)]))
        cine = folder / f"{pid}_4d.nii.gz"
        if cine.is_file():
            n = frame_count(cine)
            outputs = [(f"{pid}_frame{t + 1:02d}", t) for t in range(n) if t + 1 not in labeled_frames]
            if n == 1:
                problems.append((str(cine), "cine file is not 4D; give the patientXXX_4d.nii.gz from the ACDC download"))
            elif outputs:
                jobs.append(Job(str(cine), outputs=outputs))
        elif not labeled_frames:
            problems.append((str(folder), "no Info.cfg and no patientXXX_4d.nii.gz; this is not an ACDC patient folder"))
    return jobs


def _paired(raw: Path, problems: list, pattern: str, label_suffix: str, labeled_if) -> list[Job]:
    """Files named ``<case><image suffix>`` with labels ``<case><label suffix>`` anywhere below raw."""
    images, labels = {}, {}
    for path in sorted(raw.rglob("*")):
        split = split_ext(path.name) if path.is_file() else None
        if not split or path.name.startswith("."):
            continue
        m = re.fullmatch(pattern, split[0])
        if not m:
            continue
        case, is_label = m.group("case"), bool(m.group("label"))
        target = labels if is_label else images
        if case in target:
            problems.append((str(path), f"case id {case!r} also given by {target[case]}; keep one of the two files"))
            continue
        target[case] = path
    jobs = []
    for case, path in images.items():
        label = labels.pop(case, None)
        jobs.append(Job(str(path), str(label) if label else None, expect_label=labeled_if(case),
                        outputs=[(case, None)]))
    for case, path in labels.items():
        problems.append((str(path), f"label without an image for case {case!r}; add the image or remove the label"))
    return jobs


def _chd(raw: Path, problems: list) -> list[Job]:
    return _paired(raw, problems, r"(?P<case>ct_\d+)_(?:image|(?P<label>label))", "_label", lambda c: True)


def _mmwhs(raw: Path, problems: list) -> list[Job]:
    return _paired(raw, problems, r"(?P<case>(?:ct|mr)_(?:train|test)_\d+)_(?:image|(?P<label>label))", "_label",
                   lambda c: "_train_" in c)


HVSMR_VARIANTS = ("training_sa_crop", "training_axial_crop", "training_axial_full")  # first found is used


def _hvsmr(raw: Path, problems: list) -> list[Job]:
    """Pairs by (variant, patient); per patient the paper's short-axis crop is preferred."""
    jobs = _paired(raw, problems, r"(?P<case>.*pat\d+)(?P<label>-label)?", "-label", lambda c: False)
    by_patient: dict[str, list] = {}
    for job in jobs:
        variant, pat = re.fullmatch(r"(.*?)_?(pat\d+)", job.outputs[0][0]).groups()
        job.outputs = [(pat, None)]  # the id is patN: the file prefix says nothing about the patient
        by_patient.setdefault(pat, []).append((HVSMR_VARIANTS.index(variant) if variant in HVSMR_VARIANTS
                                               else len(HVSMR_VARIANTS), variant, job))
    return [min(cands, key=lambda c: (c[0], c[1]))[2] for _, cands in sorted(by_patient.items())]


ADAPTERS = {"generic": _generic, "images": _images, "acdc": _acdc, "chd": _chd, "mmwhs": _mmwhs, "hvsmr": _hvsmr}


def discover(raw: Path, layout: str, channel: int = 0) -> tuple[list[Job], list[tuple[str, str]]]:
    """Jobs for every source in ``raw`` under ``layout``, and the problems found on the way.

    ``channel`` (``data.channel``) is the one taken from multi-channel cases (generic layout)."""
    problems: list[tuple[str, str]] = []
    jobs = _generic(raw, problems, channel) if layout == "generic" else ADAPTERS[layout](raw, problems)
    seen: dict[str, str] = {}
    unique = []
    for job in jobs:
        bad = None
        for vid in job.vids:
            try:
                zstore.check_volume_id(vid)
            except UserError as err:
                bad = str(err)
                break
            if vid in seen:
                bad = f"volume id {vid!r} also used by {seen[vid]}; rename or remove one of them"
                break
        if bad:
            problems.append((job.image, bad))
            continue
        for vid in job.vids:
            seen[vid] = job.image
        unique.append(job)
    return unique, problems


def _dataset_json(raw: Path) -> dict | None:
    """``raw/dataset.json`` (MSD / nnU-Net), or None when there is none."""
    path = raw / "dataset.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{path} is not valid JSON; fix it or remove it") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not a JSON object ({{...}}); fix it or remove it")
    return meta


def declared_channels(raw: Path) -> tuple[int, str] | None:
    """``(count, key)`` of the input channels dataset.json declares: nnU-Net v2 ``channel_names`` or
    MSD ``modality`` (``{"0": "FLAIR", "1": "T1w", ...}``); None when it declares none. A key that is
    not a mapping is ignored, like ``labels``."""
    meta = _dataset_json(raw)
    for key in ("channel_names", "modality"):
        names = (meta or {}).get(key)
        if not isinstance(names, dict) or not names:
            continue
        if sorted(str(k) for k in names) != sorted(str(i) for i in range(len(names))):
            raise UserError(f"{raw / 'dataset.json'}: '{key}' must map channel ids 0..{len(names) - 1} to names "
                            f"(got ids {', '.join(map(str, names))}); fix it")
        return len(names), key
    return None


def class_names(raw: Path, layout: str) -> list[str] | None:
    """The dataset's class names: fixed for the paper's datasets, from dataset.json for generic."""
    if layout in CLASS_NAMES:
        return list(CLASS_NAMES[layout])
    if layout != "generic":
        return None
    path = raw / "dataset.json"
    meta = _dataset_json(raw)
    labels = meta.get("labels") if meta else None
    if not isinstance(labels, dict) or not labels:
        return None
    try:
        if all(str(k).isdigit() for k in labels):  # MSD: {"0": "background", ...}
            by_id = {int(k): str(v) for k, v in labels.items()}
        else:  # nnU-Net v2: {"background": 0, ...}
            by_id = {int(v): str(k) for k, v in labels.items()}
    except (TypeError, ValueError):
        raise UserError(f"{path}: 'labels' must map class ids to names") from None
    return [by_id.get(i, f"class_{i}") for i in range(max(by_id) + 1)]
