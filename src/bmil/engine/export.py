"""ONNX export: one model per modality, each computing bmil's test feature.

Each file maps ``images`` float32 [B, 3, H, W] (normalised as ``test_transform`` does) to
``features`` float32 [B, D]: the BN-neck output averaged with that of the horizontally
flipped image, L2-normalised — the same feature ``bmil extract`` writes. The batch size
is dynamic; H and W are fixed to the checkpoint's input size.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bmil.data.records import INFRARED, MODALITY_NAMES, VISIBLE
from bmil.errors import BmilError

log = logging.getLogger(__name__)

OPSET = 18


class FlipAveragedFeature(nn.Module):
    """``model`` fixed to one modality, returning the flip-averaged unit-length feature."""

    def __init__(self, model: nn.Module, modality: int, flip: bool = True) -> None:
        super().__init__()
        self.model, self.modality, self.flip = model, int(modality), flip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.model(images, self.modality)
        if self.flip:
            feats = feats + self.model(torch.flip(images, dims=[3]), self.modality)
        return nn.functional.normalize(feats, dim=1)


def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` on the CPU (NCHW), leaving ``model`` as it was."""
    return copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()


def require_onnx() -> None:
    """BmilError naming the missing packages when the ONNX exporter cannot run."""
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise BmilError(
            f"ONNX export needs the package(s) {', '.join(missing)}: install them with pip install 'bmil[export]'"
        )


def export_onnx(
    model: nn.Module, out_dir: str | Path, height: int, width: int, *, flip: bool = True, stem: str = "bmil"
) -> dict[int, Path]:
    """Write ``<stem>_visible.onnx`` and ``<stem>_infrared.onnx`` into ``out_dir``.

    model: a TwoStreamResNet (an eval-mode CPU copy is exported; the caller's model keeps
    its device and mode). Returns {modality: path}.
    """
    require_onnx()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _cpu_eval_copy(model)
    example = torch.zeros(2, 3, height, width)
    paths = {}
    for modality in (VISIBLE, INFRARED):
        path = out_dir / f"{stem}_{MODALITY_NAMES[modality]}.onnx"
        with torch.no_grad():
            program = torch.onnx.export(
                FlipAveragedFeature(model, modality, flip).eval(),
                (example,),
                dynamo=True,
                input_names=["images"],
                output_names=["features"],
                dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
                opset_version=OPSET,
                verbose=False,
            )
        program.save(str(path))
        paths[modality] = path
        log.info("wrote %s", path)
    return paths


def onnx_max_difference(path: str | Path, model: nn.Module, modality: int, images: torch.Tensor) -> float:
    """Largest absolute difference between the ONNX file's features and PyTorch's
    (:class:`FlipAveragedFeature` with flip) on ``images`` [B, 3, H, W]; needs onnxruntime."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise BmilError("checking an ONNX export needs the package onnxruntime: pip install 'bmil[export]'")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["features"], {"images": images.numpy().astype(np.float32)})[0]
    with torch.no_grad():
        expected = FlipAveragedFeature(_cpu_eval_copy(model), modality)(images).numpy()
    return float(np.abs(got - expected).max())
