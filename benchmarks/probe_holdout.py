"""What the last steps alone do to ``benchmarks/holdout.py`` runs, without training again: the networks of one or
several runs (each prepared its own way: ``--prep-args`` may differ) averaged, inputs at several scales, another
threshold, holes filled.

    python benchmarks/probe_holdout.py "../shared/data/ph2/PH2Dataset/PH2 Dataset images" --runs /tmp/s1 /tmp/r1 \\
        --scales 1 0.8,1,1.25 --thresholds 0.4 0.5 --fill-holes

For every fold ``K`` the runs share (``RUN/fold_K/output/model.pt``; its held-out patients: those missing from
``RUN/fold_K/raw``, the training patients' links), each held-out patient's images go through each network as
infer.py sends them (``Segmenter.input_probabilities``: its own preparation, window and test-time flips as the
checkpoint decided), the prepared images resized in-plane by each scale and the probabilities back, on the input's grid
(averaged over a set's scales); then each run alone and, with several, all together (probabilities averaged) are
thresholded, given the postprocessing every network's checkpoint holds, and optionally their holes filled (slice
by slice). Each patient is scored by its Dice over its cases pooled, as holdout.py scores; one line per variant,
``--json`` writes them with the patients. Binary models only. Not a test:
tests/test_benchmarks.py only smoke-runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from holdout import patients  # noqa: E402

from dice import dice_binary  # noqa: E402
from imaging.cases import find_cases, read_case  # noqa: E402
from imaging.readers import read_volume  # noqa: E402
from inference.segmenter import Segmenter, postprocess_unit  # noqa: E402
from model import model_window  # noqa: E402


class Scaled(Segmenter):
    """A segmenter whose networks see each prepared image resized in-plane by ``scale`` (the window fitted to it
    as ``model_window`` fits one), their probabilities resized back."""

    scale: float = 1.0

    def probabilities(self, x: torch.Tensor, sliding, tissue: torch.Tensor) -> torch.Tensor:
        if self.scale == 1:
            return super().probabilities(x, sliding, tissue)
        size = (x.shape[2], max(1, round(x.shape[3] * self.scale)), max(1, round(x.shape[4] * self.scale)))
        xs = F.interpolate(x, size=size, mode="trilinear")
        ts = F.interpolate(tissue.float(), size=size, mode="nearest") > 0
        fitted = model_window(self.model, sliding.window, size)
        p = super().probabilities(xs, dataclasses.replace(sliding, window=fitted), ts)
        return F.interpolate(p, size=x.shape[2:], mode="trilinear")


def foregrounds(seg: Segmenter, images: list[tuple], scale: float) -> list[np.ndarray]:
    """The foreground probability (X, Y, Z) of each (image, path) on its own grid, as infer.py computes it (one
    call of the segmenter for a patient's images), the prepared images resized in-plane by ``scale``."""
    scaled = Scaled(**{f.name: getattr(seg, f.name) for f in dataclasses.fields(seg)})
    scaled.scale = scale
    return [(p[0] if p.shape[0] == 1 else 1.0 - p[0]).numpy() for p in scaled.input_probabilities(images)]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Holes filled in each (X, Y) slice of ``mask`` (X, Y, Z)."""
    return np.stack([ndimage.binary_fill_holes(mask[:, :, z]) for z in range(mask.shape[2])], axis=2)


def folds_of(runs: list[Path]) -> list[int]:
    """The folds every run holds a trained network for (and its training patients' folder, ``raw``)."""
    def held(run: Path) -> set[int]:
        return {int(f.name.split("_")[1]) for f in run.glob("fold_*") if (f / "output" / "model.pt").is_file()
                and (f / "raw").is_dir()}
    return sorted(set.intersection(*(held(r) for r in runs)))


def probe(raw: Path, runs: list[Path], scale_sets: list[list[float]], thresholds: list[float],
          fill: bool) -> dict[str, dict[str, float]]:
    """Per variant (``"RUN|ensemble scales=... t=... [filled]"``), each held-out patient's pooled Dice."""
    folders = {f.name: f for f in patients(raw)}
    who = [*map(str, runs), *(["ensemble"] if len(runs) > 1 else [])]
    every_scale = sorted({x for group in scale_sets for x in group})
    scores: dict[str, dict[str, float]] = {}
    for k in folds_of(runs):
        segs = [Segmenter.load(r / f"fold_{k}" / "output" / "model.pt", torch.device("cpu")) for r in runs]
        rules = [r for r in segs[0].rules if all(r in s.rules for s in segs)]
        held = sorted(set(folders) - {f.name for f in (runs[0] / f"fold_{k}" / "raw").iterdir()})  # not trained on
        for name in held:
            cases = find_cases(folders[name])[0]
            truth = np.concatenate([read_case(c)["label"][0].numpy().ravel() > 0 for c in cases])
            images = [(read_volume(c.image), c.image) for c in cases]
            # each network at each scale once; a set averages them (the inverse to the input's grid is linear)
            at = {(n, x): foregrounds(s, images, x) for n, s in enumerate(segs) for x in every_scale}
            for scales in scale_sets:
                probs = [[np.mean([at[n, x][i] for x in scales], axis=0) for i in range(len(images))]
                         for n in range(len(segs))]
                if len(segs) > 1:
                    probs.append([np.mean([p[i] for p in probs], axis=0) for i in range(len(images))])
                for run, ps in zip(who, probs):
                    for t in thresholds:
                        masks = postprocess_unit([(p > t).astype(np.uint8) for p in ps],
                                                 [im.affine for im, _ in images], rules)
                        for filled in ([False, True] if fill else [False]):
                            pred = np.concatenate([(fill_holes(m > 0) if filled else m > 0).ravel() for m in masks])
                            key = f"{run} scales={','.join(map(str, scales))} t={t}{' filled' if filled else ''}"
                            scores.setdefault(key, {})[name] = float(dice_binary(pred[None, None], truth[None, None]))
    return scores


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("raw", help="the dataset root holdout.py was given")
    p.add_argument("--runs", nargs="+", required=True, help="holdout.py --work folders; several: also averaged")
    p.add_argument("--scales", nargs="+", default=["1"], help="sets of in-plane scales, each comma-separated")
    p.add_argument("--thresholds", nargs="+", type=float, default=[0.5])
    p.add_argument("--fill-holes", action="store_true", help="also score each variant with its holes filled")
    p.add_argument("--json", default=None, help="also write every variant's per-patient Dice here")
    a = p.parse_args(argv)
    runs = [Path(r) for r in a.runs]
    scale_sets = [[float(s) for s in group.split(",")] for group in a.scales]
    scores = probe(Path(a.raw), runs, scale_sets, a.thresholds, a.fill_holes)
    if not scores:
        print("no fold holds a trained network in every run", file=sys.stderr)
        return 2
    for key, per in scores.items():
        print(f"{key}: {len(per)} patients, mean Dice {np.mean(list(per.values())):.4f}  "
              + " ".join(f"{n}:{v:.3f}" for n, v in sorted(per.items())))
    if a.json:
        Path(a.json).write_text(json.dumps(scores, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
