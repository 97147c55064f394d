"""Finding cases: which files are images, which are labels, which files form one case, in every layout the pipeline
reads (MSD/nnU-Net, pairs, LGG, PH2, DICOM series, case folders, split folders); reading a raw case with its checks;
the manifest that preprocess.py writes. preprocess.py, infer.py and the benchmarks all find cases here.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from imaging.common import InputError
from imaging.readers import (
    VOLUME_SUFFIXES,
    as_label_map,
    check_image,
    check_same_grid,
    declares_2d,
    dicom_dir,
    read_channels,
    read_stack,
    read_volume,
    reader_for,
    volume_suffix,
)

MANIFEST_VERSION = 2  # 2: a data fingerprint, blank images, per-case statistics
MAX_LABELS = 256


LABEL_SUFFIXES = ("_seg", "_mask", "_label", "_lesion")  # <case>_seg.nii.gz is the label of <case>.nii.gz
# In a folder per case (BraTS), the label is the file with one of these names (or ending in a LABEL_SUFFIX).
CASE_LABEL_NAMES = ("seg", "label", "labels", "mask", "segmentation", "truth", "ground_truth", "OTMultiClass", "OT")
NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")  # nnU-Net: <case>_0000.nii.gz, <case>_0001 …
LAYOUTS = ("auto", "msd", "pairs", "lgg", "ph2", "dicom", "casefolders")
# Folder names that carry a dataset's own split (BraTS train/validation/test).
SPLIT_FOLDERS = {"train": "train", "training": "train", "tr": "train", "val": "val", "validation": "val",
                 "valid": "val", "test": "test", "testing": "test", "ts": "test"}


# ---------------------------------------------------------------- file-name rules


def case_name(path: Path) -> str:
    """File name without its volume extension; a DICOM series folder's own name."""
    if path.is_dir():
        return path.name
    suffix = volume_suffix(path) or path.suffix
    return path.name[: len(path.name) - len(suffix)]


def labelled_name(path: Path) -> str | None:
    """The case a label file names (``<case>_seg|_mask|_label|_lesion``, any case) or None for an image."""
    name = case_name(path)
    return next((name[: -len(s)] for s in LABEL_SUFFIXES if name.lower().endswith(s)), None)


def is_case_label(path: Path) -> bool:
    """A label file inside a case folder: ``seg``, ``OTMultiClass`` … or ``<anything>_seg``."""
    return case_name(path).lower() in {n.lower() for n in CASE_LABEL_NAMES} or labelled_name(path) is not None


def slice_number(path: Path) -> int | None:
    """The number a 2D slice's name ends with (``TCGA_CS_4942_19970222_12`` → 12; a ``_mask`` suffix ignored)."""
    match = re.search(r"_(\d+)$", labelled_name(path) or case_name(path))
    return int(match.group(1)) if match else None


def patient_slice(name: str, group: str) -> int | None:
    """The slice number of a case that is one of a patient's numbered 2D slices (its group is the patient, not the
    case itself); None for any other case."""
    return slice_number(Path(name)) if group and group != name else None


def patient_of(name: str, group: str) -> str | None:
    """The patient (its group) whose numbered slices a case is one of; None for a case that stands alone."""
    return group if patient_slice(name, group) is not None else None


def patient_units(cases: Sequence[tuple[str, str]]) -> list[list[int]]:
    """Indices of ``(name, group)`` pairs (a raw ``Case``'s or a manifest record's) gathered into units, in the order
    first seen: a patient's numbered slices together in slice order, every other case alone. The one rule for what is
    segmented and postprocessed as one stack (infer.py, the postprocessing decision) and scored as one Dice
    (validation, ``evaluation_patients.csv``), on the raw grid and the prepared one alike."""
    units: dict[str, list[int]] = {}
    for k, (name, group) in enumerate(cases):
        units.setdefault(patient_of(name, group) or f"\0{k}", []).append(k)
    return [sorted(u, key=lambda k: patient_slice(*cases[k])) if len(u) > 1 else u for u in units.values()]


def group_order(groups: Iterable[str], seed: int) -> list[str]:
    """The distinct groups (patients) shuffled with ``seed``: the one order every split by patient deals from
    (preprocess.py's train/validation split, train.py's ``--folds``, benchmarks/holdout.py's folds), so that a
    patient never straddles a split."""
    order = sorted(set(groups))
    random.Random(seed).shuffle(order)
    return order


def split_cases(groups: dict[str, str], val_fraction: float, seed: int) -> dict[str, str]:
    """Seeded train/validation split of ``{case: group}`` by group: ``{case: "train" | "val"}``, the first
    ``val_fraction`` of the groups in ``group_order`` validating, at least one group on each side when there are
    two."""
    order = group_order(groups.values(), seed)
    n_val = min(len(order) - 1, max(1, round(val_fraction * len(order)))) if len(order) > 1 else 0
    val = set(order[:n_val])
    return {case: ("val" if group in val else "train") for case, group in groups.items()}


def deal_folds(groups: dict[str, str], folds: int, seed: int) -> dict[str, int]:
    """``{case: fold}`` for ``{case: group}``: the groups in ``group_order`` dealt out in turn, so fold sizes differ
    by at most one group."""
    fold_of = {group: k % folds for k, group in enumerate(group_order(groups.values(), seed))}
    return {case: fold_of[group] for case, group in groups.items()}


def record_group(record: dict) -> str:
    """A manifest record's split group (its patient; the case itself when it has none)."""
    return record.get("group") or record["name"]


def is_nnunet(modalities: Sequence[str] | None) -> bool:
    """Whether modalities are nnU-Net channel numbers (``0000``, ``0001`` …) rather than names."""
    return bool(modalities) and all(NNUNET_CHANNEL.match(f"x_{m}") for m in modalities)


def match_modality(files: Sequence[Path], modality: str, where: Path) -> Path:
    """The one file among ``files`` for ``modality``: a name part (split at ``_``, ``-``, ``.``) equal to it,
    else the one part that starts with it (case-insensitive): ``Flair`` → ``Flair_subtrMeanDivStd.nii.gz``,
    ``t1c`` → ``case_t1ce.nii.gz``."""
    key = modality.lower()
    parts = {f: [t.lower() for t in re.split(r"[_\-.]", case_name(f)) if t] for f in files}
    found = [f for f, ts in parts.items() if key in ts] or [f for f, ts in parts.items()
                                                            if any(t.startswith(key) for t in ts)]
    if len(found) != 1:
        names = ", ".join(case_name(f) for f in files) or "no volumes"
        what = "no file" if not found else f"{len(found)} files"
        raise InputError(f"{where}: {what} for modality {modality!r} among {names}")
    return found[0]


# ---------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One image (one file per modality, or a stack of slices), with its label when there is one."""

    name: str
    image: Path  # the file, DICOM folder or slice folder that messages name; the first modality when there are several
    label: Path | None = None  # the mask file (or the folder of a stack's masks)
    group: str = ""  # cases of one group (a patient's slices) stay on one side of the split and are scored together
    modalities: tuple[Path, ...] = ()  # one file per modality (nnU-Net _0000/_0001, BraTS Flair/T1c), in order
    split: str = ""  # "train" | "val" | "test" when the dataset's folders say so; "" for a seeded split
    slices: tuple[Path, ...] = ()  # a patient's numbered 2D images stacked in slice order (image: their folder)
    label_slices: tuple[Path, ...] = ()

    @property
    def split_group(self) -> str:
        return self.group or self.name

    @property
    def sources(self) -> tuple[Path, ...]:
        """The image files: one per modality, or a stack's slices."""
        return self.slices or self.modalities or (self.image,)


def find_cases(root: Path, layout: str = "auto", modalities: Sequence[str] | None = None, stack: bool = False,
               skip: Sequence[Path] = ()) -> tuple[list[Case], list[Case]]:
    """(labelled, unlabelled) cases under ``root`` in one of ``LAYOUTS``; ``auto`` tells them apart:

    - ``msd``: ``imagesTr/labelsTr[/imagesTs]``; nnU-Net's ``<case>_0000``, ``<case>_0001`` … are one case's
      modalities (also in a plain folder of such files when ``modalities`` are channel numbers);
    - ``casefolders``: a folder per case, one file per modality (``modalities`` picks them) and a label named
      ``seg``, ``OTMultiClass`` … (BraTS);
    - ``pairs``: ``<case>`` + ``<case>_seg|_mask|_label|_lesion`` anywhere below (flat, LGG, PH2), where ``<case>``
      may be a folder holding a DICOM series; ``lgg``, ``ph2``, ``dicom`` take only TIFF, BMP or DICOM cases.

    ``stack``: each folder of numbered 2D slices becomes one 3D case (``--stack-slices``). Hidden files and
    folders, the folders in ``skip`` and prepared folders (they hold ``.cases/``) are not read.
    """
    if not root.is_dir():
        raise InputError(f"{root}: input folder does not exist")
    folders = _folders(root, skip)
    if layout == "auto":
        layout = detect_layout(root, folders, modalities)
    if layout == "msd":
        labelled, unlabelled = _find_msd(root, modalities)
    elif layout == "casefolders":
        labelled, unlabelled = _find_case_folders(folders, modalities)
    else:
        if modalities:
            raise InputError(f"{root}: --modalities needs a folder per case (--layout casefolders) or nnU-Net files")
        only = {"lgg": (".tif", ".tiff"), "ph2": (".bmp",), "dicom": ()}.get(layout)
        labelled, unlabelled = _find_flat(root, folders, only)
    if stack:
        stacks = stack_slices(labelled + unlabelled)
        labelled, unlabelled = [c for c in stacks if c.label], [c for c in stacks if not c.label]
    return _with_folder_splits(root, labelled), _with_folder_splits(root, unlabelled)


def _folders(root: Path, skip: Sequence[Path]) -> list[Path]:
    """``root`` and the folders below it that may hold cases, in name order."""
    skipped = {Path(s).resolve() for s in skip}
    found = []
    for folder in [root, *sorted(d for d in root.rglob("*") if d.is_dir())]:
        parts = folder.relative_to(root).parts
        if any(p.startswith(".") for p in parts) or any(f.resolve() in skipped or (f / ".cases").is_dir()
                                                        for f in [folder, *folder.parents][: len(parts) + 1]):
            continue
        found.append(folder)
    return found


def detect_layout(root: Path, folders: Sequence[Path], modalities: Sequence[str] | None) -> str:
    """``msd`` when ``imagesTr`` exists or modalities are nnU-Net numbers; ``casefolders`` when modalities are named
    or a folder holds a label file named ``seg``, ``OTMultiClass`` … beside other volumes; else ``pairs``."""
    if (root / "imagesTr").is_dir() or is_nnunet(modalities):
        return "msd"
    if modalities:
        return "casefolders"
    for folder in folders:
        files = _volumes(folder)
        names = {case_name(f).lower() for f in files}
        if len(files) > 1 and names & {n.lower() for n in CASE_LABEL_NAMES}:
            return "casefolders"
    return "pairs"


def _with_folder_splits(root: Path, cases: list[Case]) -> list[Case]:
    """Cases below ``train/``, ``validation/``, ``test/`` folders take that split."""
    out = []
    for case in cases:
        parts = [p.lower() for p in case.image.relative_to(root).parts[:-1]]
        split = next((SPLIT_FOLDERS[p] for p in parts if p in SPLIT_FOLDERS), "")
        out.append(dataclasses.replace(case, split=split))
    return out


def _volumes(folder: Path) -> list[Path]:
    """Volume files in ``folder``, hidden ones left out."""
    return sorted(p for p in folder.iterdir() if p.is_file() and volume_suffix(p) and not p.name.startswith("."))


def _find_msd(root: Path, modalities: Sequence[str] | None) -> tuple[list[Case], list[Case]]:
    """MSD folders (or, without ``imagesTr``, ``root`` itself as a folder of images); ``<case>_0000`` … files whose
    ``<case>`` has a label (or none has) are one case's modalities."""
    if not (root / "imagesTr").is_dir() and not is_nnunet(modalities):
        raise InputError(f"{root}: --layout msd needs an imagesTr folder")
    labels_dir = root / "labelsTr"
    labels = {case_name(p): p for p in _volumes(labels_dir)} if labels_dir.is_dir() else {}
    subs = [root / s for s in ("imagesTr", "imagesTs") if (root / s).is_dir()] or [root]
    found = [p for sub in subs for p in _volumes(sub)]
    nnunet = all(NNUNET_CHANNEL.match(case_name(p)) for p in found) and not labels.keys() & {
        case_name(p) for p in found}
    per_case: dict[str, list[Path]] = {}
    for path in found:
        name = NNUNET_CHANNEL.match(case_name(path))["case"] if nnunet else case_name(path)
        per_case.setdefault(name, []).append(path)
    orphans = sorted(set(labels) - set(per_case))
    if orphans:
        raise InputError(f"{labels[orphans[0]]}: label has no image in {root / 'imagesTr'}")
    cases = [_msd_case(n, sorted(paths), labels.get(n), modalities if nnunet else None)
             for n, paths in sorted(per_case.items())]
    if nnunet:
        counts = {len(c.sources) for c in cases}
        if len(counts) > 1:
            odd = min(cases, key=lambda c: len(c.sources))
            raise InputError(f"{odd.image}: case {odd.name} has {len(odd.sources)} modality file(s), others "
                             f"{max(counts)}")
    return [c for c in cases if c.label], [c for c in cases if not c.label]


def dataset_names(root: Path) -> dict[str, Any]:
    """What the ``dataset.json`` of an MSD or nnU-Net folder (beside ``imagesTr``) names: ``channel_names`` (one per
    input channel, in order: MSD's "modality", nnU-Net's "channel_names") and ``label_names`` ({"value": name}:
    MSD's {"1": "edema"}, nnU-Net's {"edema": 1}); None for what it does not say, or without such a file."""
    path = root / "dataset.json"
    names: dict[str, Any] = {"channel_names": None, "label_names": None}
    if not (root / "imagesTr").is_dir() or not path.is_file():
        return names
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: not a readable dataset.json ({type(exc).__name__})") from None
    channels, labels = info.get("channel_names") or info.get("modality"), info.get("labels")
    if isinstance(channels, dict) and all(str(k).isdigit() for k in channels):
        names["channel_names"] = [str(channels[k]) for k in sorted(channels, key=int)]
    if isinstance(labels, dict) and all(str(k).isdigit() for k in labels):
        names["label_names"] = {str(int(k)): str(v) for k, v in labels.items()}
    elif isinstance(labels, dict) and all(isinstance(v, int) for v in labels.values()):
        names["label_names"] = {str(v): str(k) for k, v in labels.items()}
    return names


def _msd_case(name: str, paths: list[Path], label: Path | None, modalities: Sequence[str] | None) -> Case:
    """One MSD/nnU-Net case; ``modalities`` (``0000`` …) picks nnU-Net channel files, all of them when None."""
    if modalities:
        by_id = {NNUNET_CHANNEL.match(case_name(p))["channel"]: p for p in paths}
        missing = [m for m in modalities if m.zfill(4) not in by_id]
        if missing:
            raise InputError(f"{paths[0].parent}: case {name} has no modality file {name}_{missing[0].zfill(4)}")
        paths = [by_id[m.zfill(4)] for m in modalities]
    return Case(name, paths[0], label, modalities=tuple(paths) if len(paths) > 1 else ())


def _find_case_folders(folders: Sequence[Path], modalities: Sequence[str] | None) -> tuple[list[Case], list[Case]]:
    """A case per folder that holds volumes directly: its modality files by ``modalities``, its label by name."""
    labelled, unlabelled = [], []
    seen: dict[str, Path] = {}
    for folder in folders:
        files = _volumes(folder)
        if not files:
            continue
        label_files = [f for f in files if is_case_label(f)]
        images = [f for f in files if f not in label_files]
        if len(label_files) > 1:
            raise InputError(f"{folder}: several label files ({', '.join(case_name(f) for f in label_files)}); "
                             "keep one per case folder")
        if not images:
            raise InputError(f"{label_files[0]}: label has no image beside it")
        if modalities:
            images = [match_modality(images, m, folder) for m in modalities]
        elif len(images) > 1:
            raise InputError(f"{folder}: holds {len(images)} images ({', '.join(case_name(f) for f in images)}); "
                             "choose the input modalities with --modalities, e.g. --modalities "
                             f"{','.join(case_name(f).split('_')[0] for f in images[:2])}")
        if folder.name in seen:
            raise InputError(f"{folder}: case name {folder.name!r} also used by {seen[folder.name]}")
        seen[folder.name] = folder
        case = Case(folder.name, images[0], label_files[0] if label_files else None,
                    modalities=tuple(images) if len(images) > 1 else ())
        (labelled if case.label else unlabelled).append(case)
    return labelled, unlabelled


def _find_flat(root: Path, folders: Sequence[Path], only: tuple[str, ...] | None = None
               ) -> tuple[list[Case], list[Case]]:
    """Pairs anywhere below ``root``: ``<case>[_image].ext`` + ``<case>_seg|_mask|_label|_lesion.ext`` (LGG, PH2 …).

    A folder holding one DICOM series is the image of the case it is named after; a volume of that name is its
    mask. Slices kept in one folder (LGG: a patient's) form a group that the split keeps together. ``only``: the
    image suffixes to take (``()``: DICOM cases only; None: all).
    """
    images: dict[str, Path] = {d.name: d for d in folders if d.parent == root and dicom_dir(d)}
    labels: dict[str, Path] = {}
    for path in (p for folder in folders for p in _volumes(folder)):
        name, base = case_name(path), labelled_name(path)
        if base is None and name.endswith("_image"):  # <case>_image + <case>_label (pyradiomics, Slicer)
            name = name[: -len("_image")]
        target = labels if base is not None or name in images else images
        key = name if base is None else base
        if target is images and only is not None and volume_suffix(path) not in only:
            continue
        if key in target and target[key] != path:
            raise InputError(f"{path}: case name {key!r} also used by {target[key]}; case names must be unique")
        target[key] = path
    labels = {k: v for k, v in labels.items() if k in images or only is None}  # others belong to skipped images
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise InputError(f"{labels[orphans[0]]}: label has no image named {orphans[0]}.* beside it")
    per_folder: dict[Path, int] = {}
    for path in images.values():
        per_folder[path.parent] = per_folder.get(path.parent, 0) + 1
    groups = {n: slice_group(p) if p.parent != root and per_folder[p.parent] > 1 else "" for n, p in images.items()}
    labelled = [Case(n, images[n], labels[n], groups[n]) for n in sorted(images) if n in labels]
    unlabelled = [Case(n, images[n], None, groups[n]) for n in sorted(images) if n not in labels]
    return labelled, unlabelled


def slice_group(path: Path) -> str:
    """The group of an image kept in a folder with others: the folder's name (a patient's) for a numbered 2D slice
    (``<patient>_<n>``, as ``patient_units`` takes it), whose patient stays on one side of the split; "" for a
    volume or a picture, a case of its own (MSD's ``imagesTr/``, a folder of scans or of photographs)."""
    return path.parent.name if slice_number(path) is not None and declares_2d(path) else ""


def stack_slices(cases: list[Case]) -> list[Case]:
    """One 3D case per folder (a patient's) of numbered 2D slices, slices ordered by number, never by name.

    Every slice must be labelled (or none) and numbered; one missing is an error naming it.
    """
    groups: dict[Path, list[Case]] = {}
    for case in cases:
        if case.image.is_dir() or slice_number(case.image) is None:
            raise InputError(f"{case.image}: not a numbered 2D slice (<patient>_<n>.tif); cannot stack slices")
        groups.setdefault(case.image.parent, []).append(case)
    stacked = []
    for folder, members in sorted(groups.items()):
        members.sort(key=lambda c: slice_number(c.image))
        numbers = [slice_number(c.image) for c in members]
        if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
            gap = next(n + 1 for n, m in zip(numbers, numbers[1:]) if m != n + 1)
            raise InputError(f"{folder}: slice {gap} is missing or repeated; cannot stack")
        labelled = all(c.label for c in members)
        stacked.append(Case(folder.name, folder, folder if labelled else None, slices=tuple(c.image for c in members),
                            label_slices=tuple(c.label for c in members) if labelled else ()))
    return stacked


def find_inputs(items: Sequence[str | Path], modalities: Sequence[str] | None = None, stacked: bool = False,
                skip: Sequence[Path] = ()) -> list[Case]:
    """Cases to segment, from files and folders as a user gives them: a file as it is (with nnU-Net modality
    numbers, ``<case>_0000`` brings its ``_0001`` …); a folder that holds one DICOM series as that series; any
    other folder as ``find_cases`` reads it for preprocess.py (masks found beside images are not inputs).
    ``stacked``: a model trained on stacked slices takes each folder of numbered slices as one case."""
    cases: dict[tuple[Path, ...], Case] = {}
    for item in map(Path, items):
        if item.is_dir() and _one_series(item):
            found = [Case(item.name, item)]  # a DICOM series: a volume, a case of its own
        elif item.is_dir():
            labelled, unlabelled = find_cases(item, "auto", modalities, stacked, skip)
            # the slices right inside a folder given by itself (one patient's) are that folder's group, as those one
            # level down are and as a slice given alone is: its numbered slices are postprocessed as one
            found = sorted((dataclasses.replace(c, label=None, label_slices=(),
                                                group=c.group or (slice_group(c.image) if c.image.parent == item
                                                                  else ""))
                            for c in labelled + unlabelled), key=lambda c: c.name)
            if not found:
                raise InputError(f"{item}: folder holds no volumes ({', '.join(VOLUME_SUFFIXES)} or DICOM series)")
        elif not item.is_file():
            raise InputError(f"{item}: no such file")
        else:
            reader_for(item)  # an unsupported suffix is an error naming the readable ones
            found = [_file_case(item, modalities if is_nnunet(modalities) else None)]
        cases.update((c.sources, c) for c in found)  # an nnU-Net case named by each of its files is one case
    return list(cases.values())


def _one_series(folder: Path) -> bool:
    """Whether ``folder`` holds DICOM files in one folder at or below it (several: a dataset of series)."""
    try:
        return dicom_dir(folder) is not None
    except InputError:
        return False


def _file_case(path: Path, nnunet: Sequence[str] | None) -> Case:
    """One file, or with nnU-Net ``modalities`` the ``<case>_0000``, ``<case>_0001`` … beside ``path``."""
    match = NNUNET_CHANNEL.match(case_name(path))
    if not nnunet:
        return Case(case_name(path), path, group=slice_group(path))
    if not match:
        raise InputError(f"{path}: the model takes modalities {list(nnunet)}; name the files <case>_0000.nii.gz …")
    siblings = tuple(path.with_name(f"{match['case']}_{m}{volume_suffix(path)}") for m in nnunet)
    missing = next((s for s in siblings if not s.is_file()), None)
    if missing:
        raise InputError(f"{missing}: no such file (modality {case_name(missing)[-4:]} of case {match['case']})")
    return Case(match["case"], siblings[0], group=slice_group(path), modalities=siblings)


def with_truth(case: Case, truth: Path) -> Case:
    """``case`` with its true mask: a file, or for a stack the folder of its numbered masks
    (``<patient>_<n>_mask.tif``), one per slice."""
    if not case.slices:
        return dataclasses.replace(case, label=truth)
    masks = {slice_number(p): p for p in (truth.iterdir() if truth.is_dir() else [])
             if volume_suffix(p) and labelled_name(p) is not None}
    wanted = [slice_number(p) for p in case.slices]
    missing = next((n for n in wanted if n not in masks), None)
    if missing is not None:
        raise InputError(f"{truth}: no mask for slice {missing} of {case.name} (give the folder of its masks)")
    return dataclasses.replace(case, label=truth, label_slices=tuple(masks[n] for n in wanted))


# ---------------------------------------------------------------- reading a case


def read_case(case: Case, channel: int | None = None, labels: Sequence[int] | None = None) -> dict:
    """``{"image": (C, X, Y, Z)[, "label": (1, X, Y, Z)]}`` as stored, after the checks on their content: finite,
    non-constant intensities (each modality file answers for its own), a mask of non-negative integers (within
    ``labels`` when given) on the image's grid. ``channel``: which channel of a colour image to keep (all: None)."""
    out = {"image": read_stack(case.slices, channel) if case.slices else read_channels(case.sources, channel)}
    for k, path in enumerate(case.modalities):
        check_image(out["image"][k : k + 1], path)
    check_image(out["image"], case.image)
    if case.label:
        stored = read_stack(case.label_slices) if case.label_slices else read_volume(case.label)
        out["label"] = as_label_map(stored, case.label)
        check_same_grid(out["label"], case.label, out["image"], case.image)
        check_label_values(out["label"], case.label, labels)
    return out


def check_label_values(label: torch.Tensor, path: Path, allowed: Sequence[int] | None) -> None:
    """Labels are non-negative integers, few of them, and within ``allowed`` when that is given."""
    values = torch.unique(label)
    if not torch.equal(values, values.round()) or values.min() < 0:
        raise InputError(f"{path}: mask values are not non-negative integers ({values[:4].tolist()}…)")
    if len(values) > MAX_LABELS:
        raise InputError(f"{path}: mask holds {len(values)} distinct values; is it an image, not a label map?")
    extra = sorted(set(int(v) for v in values) - set(allowed)) if allowed is not None else []
    if extra:
        raise InputError(f"{path}: mask values {extra} are not in --labels {list(allowed)}")


# ---------------------------------------------------------------- the manifest


def load_manifest(data_dir: Path) -> dict[str, Any]:
    """The manifest written by preprocess.py (``data_dir/dataset.json``), checked for version and content."""
    path = data_dir / "dataset.json"
    if not path.is_file():
        raise InputError(f"{path}: no manifest (run preprocess.py first)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: manifest is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise InputError(f"{path}: manifest version {manifest.get('version') if isinstance(manifest, dict) else '?'}"
                         f" is not {MANIFEST_VERSION}; run preprocess.py again")
    if not isinstance(manifest.get("cases"), list):
        raise InputError(f"{path}: not a manifest written by preprocess.py (no list of cases)")
    return manifest


def cases_from_manifest(prep_dir: Path, split: str) -> list[Case]:
    """The labelled ``split`` cases of a prepared dataset, as their original files with their true masks."""
    path = prep_dir / "dataset.json"
    try:
        cases = [Case(r["name"], Path(r["image"]), Path(r["label"]), r.get("group", ""),
                      tuple(Path(p) for p in r.get("images", [])), split, tuple(Path(p) for p in r.get("slices", [])),
                      tuple(Path(p) for p in r.get("label_slices", [])))
                 for r in load_manifest(prep_dir)["cases"] if r.get("split") == split and r.get("label")]
    except (KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{path}: not a manifest written by preprocess.py ({type(exc).__name__}: {exc})") from None
    if not cases:
        raise InputError(f"{path}: no labelled {split!r} cases to evaluate")
    return cases
