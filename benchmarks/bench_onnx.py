"""The two engines of infer.py on this machine: PyTorch against ONNX Runtime, same checkpoint, same volumes.

    python benchmarks/bench_onnx.py --checkpoint output/model.pt data/raw/synth_001.nii.gz [--repeats 3]

Exports the checkpoint to a temporary ONNX file (``infer.py --export-onnx``'s function; prints the max abs
difference of the logits on a random window), then times (a) one network pass on a batch of the checkpoint's
windows (2, the CPU's windows per pass) and (b) each volume through ``segmenter.Segmenter`` (preprocessing, sliding
window, inverse) with each engine. Runs alternate (torch, onnx, torch, onnx …) so that machine load hits both alike;
medians of the repeats. Prints the seconds, the ratio ONNX Runtime / PyTorch and the Dice between the two masks.
Both engines use the same thread count (PyTorch's, which OMP_NUM_THREADS sets) and fp32. Not a test: nothing is
asserted.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset import PrepParams  # noqa: E402
from dice import dice_binary  # noqa: E402
from imaging.cases import Case, read_case  # noqa: E402
from inference import segmenter  # noqa: E402
from inference.onnx_engine import OnnxNetwork, export_onnx  # noqa: E402


def timed(fn, repeats: int) -> tuple[list[float], object]:
    """Seconds of each call of ``fn`` and its last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def alternate(fns: dict, repeats: int) -> dict[str, tuple[float, object]]:
    """Median seconds and last result of each function, run in turn ``repeats`` times (one warm-up each first)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    results: dict = {}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t, results[k] = timed(fn, 1)
            times[k] += t
    return {k: (statistics.median(times[k]), results[k]) for k in fns}


def network_pass(segmenter: segmenter.Segmenter, windows: torch.Tensor):
    """One pass of the engine's network on ``windows`` (N, C, D, H, W), laid out as ``predict_logits`` lays them."""
    layout = torch.contiguous_format if isinstance(segmenter.model, OnnxNetwork) else torch.channels_last_3d
    return lambda: segmenter.model(windows.contiguous(memory_format=layout))


def ratio_line(name: str, runs: dict, digits: int) -> str:
    t, o = runs["torch"][0], runs["onnx"][0]
    return f"{name}: torch {t:.{digits}f} s, onnx {o:.{digits}f} s, ratio onnx/torch {o / t:.2f}"


def bench(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        diff = export_onnx(Path(args.checkpoint), onnx_path)
        print(f"export: max abs difference of the logits on a random window {diff:.3g}")
        # PyTorch in fp32, as ONNX Runtime runs (infer.py's default, bf16 on a CPU that has it, is faster than either)
        engines = {e: segmenter.load_segmenter([Path(args.checkpoint if e == "torch" else onnx_path)], "cpu", e,
                                               segmenter.Given(amp=False)) for e in ("torch", "onnx")}
        ckpt, window = engines["torch"].ckpt, engines["torch"].window
        windows = torch.rand(2, ckpt["model_args"]["in_channels"], *window)
        with torch.inference_mode():
            runs = alternate({e: network_pass(s, windows) for e, s in engines.items()}, args.repeats * 3)
        print(ratio_line(f"network pass on 2 windows {tuple(window)}", runs, 4))
        channel = PrepParams.from_dict(ckpt["prep_params"]).channel
        for volume in map(Path, args.volumes):
            image = read_case(Case(volume.name, volume), channel)["image"]
            with torch.inference_mode():
                runs = alternate({e: functools.partial(s, image, volume) for e, s in engines.items()}, args.repeats)
            masks = [runs[e][1] for e in ("torch", "onnx")]
            dice = dice_binary(*(torch.from_numpy(m > 0)[None, None] for m in masks)).item()
            print(ratio_line(f"{volume.name} {tuple(image.shape[1:])}", runs, 2)
                  + f"; Dice between the masks {dice:.4f}, voxels differing {int(np.sum(masks[0] != masks[1]))}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("volumes", nargs="*", help="volumes (or pictures) to segment with both engines")
    p.add_argument("--checkpoint", default="output/model.pt")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    print(f"threads: {torch.get_num_threads()}")
    bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
