"""``bmil export``: ONNX export, one model per modality, each computing bmil's test feature.

Each file maps ``images`` float32 [B, 3, H, W] (normalised as ``test_transform`` does) to
``features`` float32 [B, D]: the BN-neck outputs of the image and of its horizontally
flipped copy, each L2-normalised, averaged and L2-normalised again — the same feature
``bmil extract`` writes. The batch size is dynamic; H and W are fixed to the checkpoint's
input size. What a consumer must do to the images (resize, scaling, normalisation) and what
the output is are also written into each file's metadata (:func:`onnx_metadata`, keys ``bmil.*``).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bmil.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from bmil.errors import BmilError
from bmil.inference import combine_views, load_model
from bmil.records import INFRARED, MODALITY_NAMES, VISIBLE

log = logging.getLogger(__name__)

OPSET = 18


class FlipAveragedFeature(nn.Module):
    """``model`` fixed to one modality, returning the test feature: n(n(f) + n(f')) of the
    BN-neck outputs f and f' of the image and its mirror (n = L2-normalise; n(f) without
    flip), as :func:`bmil.inference.combine_views` computes it."""

    def __init__(self, model: nn.Module, modality: int, flip: bool = True) -> None:
        super().__init__()
        self.model, self.modality, self.flip = model, int(modality), flip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.model(images, self.modality)
        flipped = self.model(torch.flip(images, dims=[3]), self.modality) if self.flip else None
        return combine_views(feats, flipped, "test")


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


def onnx_metadata(modality: int, height: int, width: int, feat_dim: int, *, flip: bool = True,
                  resize: str = "lanczos") -> dict[str, str]:
    """The ``bmil.*`` metadata of an exported file: the preprocessing its input needs and
    what its output is, in words a consumer without bmil can follow."""
    mean = ", ".join(f"{v:g}" for v in IMAGENET_MEAN)
    std = ", ".join(f"{v:g}" for v in IMAGENET_STD)
    each = "of the image and of its horizontal mirror, each L2-normalised, summed, then" if flip else "then"
    return {
        "bmil.modality": MODALITY_NAMES[modality],
        "bmil.input": f"images: float32 [batch, 3, {height}, {width}] (N, C, H, W), RGB channel order",
        "bmil.preprocessing": (
            f"decode as 3-channel RGB (an infrared image too), resize to {height}x{width} (height x width) with "
            f"{resize} interpolation (PIL), no crop or padding; scale to [0, 1] (divide by 255); subtract the "
            f"mean ({mean}) and divide by the std ({std}) per channel"
        ),
        "bmil.resize": resize,
        "bmil.mean": mean,
        "bmil.std": std,
        "bmil.output": (f"features: float32 [batch, {feat_dim}], the BN-neck output {each} L2-normalised: unit "
                        "length, so the cosine similarity of two images is the dot product of their features"),
        "bmil.flip_averaged": str(flip).lower(),
        "bmil.l2_normalised": "true",
    }


def _write_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"bmil {metadata['bmil.modality']} feature extractor: {metadata['bmil.output']}"
    onnx.save(proto, str(path))


def export_onnx(
    model: nn.Module, out_dir: str | Path, height: int, width: int, *, flip: bool = True, stem: str = "bmil",
    resize: str = "lanczos",
) -> dict[int, Path]:
    """Write ``<stem>_visible.onnx`` and ``<stem>_infrared.onnx`` into ``out_dir``, each
    with :func:`onnx_metadata` (``resize``: the interpolation the model's scoring uses,
    ``eval.resize``).

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
        _write_metadata(path, onnx_metadata(modality, height, width, model.feat_dim, flip=flip, resize=resize))
        paths[modality] = path
        log.debug("wrote %s", path)
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


def run(args: argparse.Namespace) -> int:
    """Export ``--checkpoint`` (one file per modality) and print each file with, unless
    ``--no-check``, its largest difference from PyTorch."""
    require_onnx()
    if not args.verbose:  # the exporter's own INFO lines (onnxscript prints dozens) only when asked
        for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo"):
            logging.getLogger(name).setLevel(logging.WARNING)
    model, cfg = load_model(args.checkpoint, "cpu")
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    paths = export_onnx(model, out, cfg.data.height, cfg.data.width, stem=Path(args.checkpoint).stem,
                        resize=cfg.eval.resize)
    images = torch.randn(2, 3, cfg.data.height, cfg.data.width, generator=torch.Generator().manual_seed(0))
    for modality, path in paths.items():
        line = f"wrote {path}"
        if not args.no_check:
            line += f" (largest difference from PyTorch: {onnx_max_difference(path, model, modality, images):.2e})"
        print(line)
    return 0
