"""Inference speed: a plain MONAI sliding-window call against infer.py's path, same checkpoint and volumes.

    python benchmarks/bench_infer.py --prep data/prep --checkpoint output/model.pt [--split val] [--repeats 3]

(a) plain: ``monai.inferers.sliding_window_inference`` as the seed project called it: the training crop as
    window ((48, 96, 96) there), gaussian, fp32, under ``torch.no_grad``;
(b) ours: ``model.predict_logits`` as ``infer.py`` runs it (the checkpoint's inference window, shrunk to a
    smaller volume for batch norm, windows without tissue skipped, channels-last, ``inference_mode``, AMP on CUDA).

Both use the checkpoint's overlap and windows per pass (``--sw-batch-size`` overrides; the checkpoint's default is
the device's, ``model.default_sw_batch_size``).

Both start from the same prepared volume and end with a mask on the original grid (the same inversion), scored
against the true mask. Runs alternate (a, b, a, b …) so that machine load hits both alike. Prints per case and
overall: seconds (median of the repeats), the ratio, each Dice against the truth, the Dice between the masks.
Not a test: nothing here asserts; tests/test_benchmarks.py only smoke-runs it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train import synchronize  # noqa: E402  (this folder)

from dataset import PrepParams, prepare_transforms, prepared_tissue  # noqa: E402
from dice import dice_binary  # noqa: E402
from imaging.cases import Case, cases_from_manifest, read_case  # noqa: E402
from imaging.common import InputError  # noqa: E402
from inference.segmenter import invert_to_original  # noqa: E402
from model import (  # noqa: E402
    Sliding,
    default_sw_batch_size,
    load_checkpoint,
    model_from_checkpoint,
    predict_logits,
    probabilities,
    resolve_device,
    to_classes,
    use_amp,
)


def plain_logits(model: torch.nn.Module, image: torch.Tensor, roi: tuple[int, ...], overlap: float,
                 sw_batch_size: int) -> torch.Tensor:
    """The seed project's call: (1, C, D, H, W) → logits (1, K, D, H, W)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return sliding_window_inference(image.to(device), roi, sw_batch_size, model, overlap=overlap, mode="gaussian")


def to_mask(logits: torch.Tensor, prepared, chain) -> np.ndarray:
    """Class indices on the input's grid (X, Y, Z)."""
    probs = probabilities(logits.float())[0]
    return to_classes(invert_to_original(probs.cpu(), prepared, chain)[None])[0, 0].numpy()


def foreground_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of the foreground (every label but 0) of two masks."""
    return float(dice_binary((a > 0)[None, None], (b > 0)[None, None]))


def bench(args: argparse.Namespace) -> dict:
    """Run the comparison; returns the summary printed at the end."""
    device = resolve_device(args.device)
    ckpt = load_checkpoint(Path(args.checkpoint))
    plain = model_from_checkpoint(ckpt, Path(args.checkpoint)).to(device).eval()
    ours = model_from_checkpoint(ckpt, Path(args.checkpoint)).to(device, memory_format=torch.channels_last_3d).eval()
    window = tuple(args.window or ckpt["inference"]["window"])
    plain_roi = tuple(args.plain_roi or ckpt["config"]["crop"])
    overlap = ckpt["inference"]["overlap"]
    sw = args.sw_batch_size or ckpt["inference"]["sw_batch_size"] or default_sw_batch_size(device)
    cases = [c for c in cases_from_manifest(Path(args.prep), args.split) if not c.slices]
    cases = cases[: args.cases] if args.cases else cases
    if not cases:
        raise InputError(f"{args.prep}: no labelled {args.split} volumes")
    print(f"device {device}; plain roi {plain_roi}, ours window {window} (a batch-norm one shrunk to smaller volumes); "
          f"overlap {overlap}, {sw} windows per pass; {args.repeats} interleaved repeats per case")
    sliding = Sliding(window, overlap, sw, use_amp(None, device))
    runs = {"plain": lambda image, tissue: plain_logits(plain, image, plain_roi, overlap, sw),
            "ours": lambda image, tissue: predict_logits(ours, image, sliding, tissue)}
    rows = [bench_case(case, ckpt, runs, args.repeats, device) for case in cases]
    summary = {
        "cases": len(rows),
        "plain_s": sum(r["plain_s"] for r in rows), "ours_s": sum(r["ours_s"] for r in rows),
        "plain_dice": float(np.mean([r["plain_dice"] for r in rows])),
        "ours_dice": float(np.mean([r["ours_dice"] for r in rows])),
        "agreement": float(np.mean([r["agreement"] for r in rows])),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    summary["speedup"] = summary["plain_s"] / summary["ours_s"]
    print(f"total over {summary['cases']} cases: plain {summary['plain_s']:.2f} s, ours {summary['ours_s']:.2f} s, "
          f"{summary['speedup']:.1f}× faster; mean Dice vs truth plain {summary['plain_dice']:.4f}, ours "
          f"{summary['ours_dice']:.4f} (difference {summary['ours_dice'] - summary['plain_dice']:+.4f}); masks "
          f"agree {summary['agreement']:.4f}; peak RSS {summary['peak_rss_mb']:.0f} MB")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB")
    return summary


def bench_case(case: Case, ckpt: dict, runs: dict, repeats: int, device: torch.device) -> dict:
    """Both ways on one case, interleaved ``repeats`` times: median seconds, Dice against the truth, agreement."""
    params = PrepParams.from_dict(ckpt["prep_params"])
    raw = read_case(case, params.channel)
    chain = prepare_transforms(params, with_label=False)
    prepared = chain({"image": raw["image"]})["image"]
    tissue = prepared_tissue(prepared, params)[None]
    times: dict[str, list[float]] = {name: [] for name in runs}
    logits: dict[str, torch.Tensor] = {}
    for _ in range(repeats):
        for name, run in runs.items():
            synchronize(device)
            t0 = time.perf_counter()
            logits[name] = run(prepared[None], tissue)
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    masks = {name: to_mask(logits[name], prepared, chain) for name in logits}
    truth = np.searchsorted(np.asarray(ckpt["label_values"]), raw["label"][0].numpy())  # as class indices
    row = {"case": case.name, "shape": list(prepared.shape[1:]),
           "plain_s": statistics.median(times["plain"]), "ours_s": statistics.median(times["ours"]),
           "plain_dice": foreground_dice(masks["plain"], truth), "ours_dice": foreground_dice(masks["ours"], truth),
           "agreement": foreground_dice(masks["plain"], masks["ours"])}
    print(f"{row['case']:>24} {row['shape']}: plain {row['plain_s']:.2f} s, ours {row['ours_s']:.2f} s "
          f"({row['plain_s'] / row['ours_s']:.1f}×); Dice vs truth plain {row['plain_dice']:.4f}, ours "
          f"{row['ours_dice']:.4f}; masks agree {row['agreement']:.4f}")
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prep", default="data/prep", help="prepared dataset (its manifest names the original files)")
    p.add_argument("--checkpoint", default="output/model.pt")
    p.add_argument("--split", default="val")
    p.add_argument("--cases", type=int, default=None, help="at most this many cases")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--window", type=int, nargs=3, default=None, help="our window (default: the checkpoint's)")
    p.add_argument("--plain-roi", type=int, nargs=3, default=None,
                   help="plain call's window (default: the training crop, (48, 96, 96) in the seed project)")
    p.add_argument("--sw-batch-size", type=int, default=None,
                   help="windows per pass of both (default: the checkpoint's, else the device's)")
    p.add_argument("--json", default=None, help="also write the summary here")
    args = p.parse_args(argv)
    try:
        summary = bench(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
