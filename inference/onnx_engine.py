"""The network as ONNX: a checkpoint exported with what inference needs in the file's metadata, checked against
PyTorch, and an exported file run by ONNX Runtime in place of the PyTorch network (``model.predict_logits``).

Like ``model.py``, this needs neither the readers nor the transform chain.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imaging.common import InputError, atomic_write
from model import INFERENCE_KEYS, load_checkpoint, model_from_checkpoint, upgraded

log = logging.getLogger("onnx")
FORMAT = "monai-segmentation-onnx/1"


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The dynamo exporter logs a warning per torchvision operator it cannot register (torchvision is not needed
    here), its optimizer logs each pass, and both warn about their internals: none of it concerns the user."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx(checkpoint: Path, out: Path, seed: int = 0) -> float:
    """Write ``checkpoint``'s network to ``out`` (ONNX, batch and spatial axes dynamic, inference metadata in
    ``metadata_props``); returns the max abs difference of ONNX Runtime's logits from PyTorch's on a random window
    (1, C, D, H, W) of the checkpoint's size."""
    ckpt = load_checkpoint(checkpoint)
    net = model_from_checkpoint(ckpt, checkpoint).eval()
    window = torch.rand(1, ckpt["model_args"]["in_channels"], *ckpt["inference"]["window"],
                        generator=torch.Generator().manual_seed(seed))
    dynamic = torch.export.Dim.DYNAMIC
    with quiet_exporter():
        program = torch.onnx.export(net, (window,), dynamo=True, input_names=["image"], output_names=["logits"],
                                    dynamic_shapes=({0: dynamic, 2: dynamic, 3: dynamic, 4: dynamic},), verbose=False)
    proto = program.model_proto
    props = {"format": FORMAT, **{k: json.dumps(ckpt.get(k)) for k in INFERENCE_KEYS}}  # JSON strings
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    import onnx

    with atomic_write(out) as tmp:
        onnx.save(proto, str(tmp))
    with torch.no_grad():
        expected = net(window).numpy()
    got = OnnxNetwork(out)(window).numpy()
    return float(np.abs(got - expected).max())


class OnnxNetwork(torch.nn.Module):
    """An exported network under ONNX Runtime (CPU), called as the PyTorch one: (N, C, D, H, W) → logits
    (N, K, D, H, W). ``ckpt`` holds the metadata (a checkpoint's inference keys); ``strides``, ``norm`` and
    ``out_channels`` are what ``predict_logits`` reads from a MONAI UNet."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        import onnxruntime

        try:
            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3  # errors only
            options.intra_op_num_threads = torch.get_num_threads()  # PyTorch's count: OMP_NUM_THREADS holds for both
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            meta = self.session.get_modelmeta().custom_metadata_map
        except Exception as exc:  # ONNX Runtime's errors (InvalidProtobuf, NoSuchFile …) derive from Exception only
            raise InputError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
        if meta.get("format") != FORMAT:
            raise InputError(f"{path}: not an ONNX export of this pipeline (make one with infer.py --export-onnx)")
        self.ckpt: dict[str, Any] = upgraded({k: json.loads(meta.get(k, "null")) for k in INFERENCE_KEYS})
        args = self.ckpt["model_args"]
        self.strides, self.norm, self.out_channels = args["strides"], args["norm"], args["out_channels"]
        # predict_logits takes the device from the first parameter: ONNX Runtime here runs on the CPU.
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"image": x.detach().cpu().float().contiguous().numpy()})[0]
        return torch.from_numpy(out)
