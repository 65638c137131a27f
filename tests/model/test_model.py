"""Tests for the two-stream backbone, its parts and pretrained-weight loading."""

from __future__ import annotations

import pytest
import torch
import torchvision

from bmil import config as bmil_config
from bmil.config import ModelConfig
from bmil.errors import CheckpointError, ConfigError
from bmil.model import (
    GeneralizedMeanPooling,
    NonLocalBlock,
    TwoStreamResNet,
    build_model,
    imagenet_weights_file,
    model_from_config,
    model_signature,
)


def _images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 64, 32, generator=generator)


@pytest.fixture(scope="module")
def resnet50_model() -> TwoStreamResNet:
    torch.manual_seed(0)
    return TwoStreamResNet(depth=50).eval()


def _perturbed_depth18(seed: int = 0) -> TwoStreamResNet:
    """A depth-18 model whose infrared stem differs from its visible stem."""
    torch.manual_seed(seed)
    model = TwoStreamResNet(depth=18).eval()
    with torch.no_grad():
        model.infrared_stem.conv1.weight.mul_(-0.5)
        model.infrared_stem.bn1.running_mean.fill_(0.3)
    return model


def test_output_shapes_and_feat_dim(resnet50_model: TwoStreamResNet) -> None:
    with torch.no_grad():
        out50 = resnet50_model(_images(2), 0)
    assert out50.shape == (2, 2048) and resnet50_model.feat_dim == 2048
    model18 = TwoStreamResNet(depth=18, non_local=False).eval()
    with torch.no_grad():
        out18 = model18(_images(3), torch.tensor([1, 0, 1]))
    assert out18.shape == (3, 512) and model18.feat_dim == 512
    assert torch.isfinite(out18).all() and torch.isfinite(out50).all()


def test_mixed_batch_equals_separate_modalities() -> None:
    model = _perturbed_depth18()
    images = _images(4)
    modality = torch.tensor([1, 0, 0, 1])
    with torch.no_grad():
        mixed = model(images, modality)
        visible = model(images[[1, 2]], 0)
        infrared = model(images[[0, 3]], 1)
        all_visible_tensor = model(images, torch.zeros(4, dtype=torch.long))
        all_visible_int = model(images, 0)
        all_infrared = model(images, 1)
    torch.testing.assert_close(mixed[[1, 2]], visible, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[[0, 3]], infrared, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(all_visible_tensor, all_visible_int)
    # The routing matters: the same image through the other stem gives another feature.
    assert (all_visible_int - all_infrared).abs().max() > 1e-2


def _stem_by_hand(stem: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """conv1 (7×7, stride 2, pad 3) → eval BatchNorm → ReLU → 3×3 max-pool (stride 2, pad 1),
    from the stem's parameters and running statistics."""
    y = torch.nn.functional.conv2d(x, stem.conv1.weight, stride=2, padding=3)
    bn = stem.bn1
    y = torch.nn.functional.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False,
                                       eps=bn.eps)
    return torch.nn.functional.max_pool2d(torch.relu(y), kernel_size=3, stride=2, padding=1)


def _route_by_hand(model: TwoStreamResNet, stem: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One stem by hand, then the shared trunk (layer1–4, GeM, BN neck)."""
    y = _stem_by_hand(stem, x)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        y = getattr(model, name)(y)
    return model.neck(model.pool(y))


def test_each_image_goes_through_the_stem_of_its_own_modality() -> None:
    """Modality 0 is the visible stem + shared trunk and modality 1 the infrared stem + trunk,
    each computed by hand from the stem's weights, also for rows of both in one batch; the
    stems are given different weights so that a swapped switch gives other features."""
    torch.manual_seed(0)
    model = TwoStreamResNet(depth=18, non_local=False)
    with torch.no_grad():
        infrared = model.infrared_stem
        infrared.conv1.weight.copy_(torch.randn_like(infrared.conv1.weight) * 0.05)
        infrared.bn1.weight.uniform_(0.5, 1.5)
        infrared.bn1.bias.normal_(0.0, 0.2)
        infrared.bn1.running_mean.normal_(0.0, 0.3)
        infrared.bn1.running_var.uniform_(0.5, 2.0)
    model.eval()
    images = _images(5, seed=3)
    modality = torch.tensor([0, 1, 1, 0, 1])
    with torch.no_grad():
        visible_route = _route_by_hand(model, model.visible_stem, images)
        infrared_route = _route_by_hand(model, model.infrared_stem, images)
        # The two routes differ on every image: each comparison below can tell them apart.
        assert ((visible_route - infrared_route).abs().amax(dim=1) > 1e-2).all()
        for given, expected in ((0, visible_route), (1, infrared_route),
                                (torch.zeros(5, dtype=torch.long), visible_route),
                                (torch.ones(5, dtype=torch.long), infrared_route)):
            torch.testing.assert_close(model(images, given), expected, atol=1e-5, rtol=1e-4)
        mixed = model(images, modality)
        by_row = torch.where(modality[:, None] == 0, visible_route, infrared_route)
        torch.testing.assert_close(mixed, by_row, atol=1e-5, rtol=1e-4)


def test_stems_are_separate_parameters_with_equal_start() -> None:
    torch.manual_seed(0)
    model = TwoStreamResNet(depth=18, non_local=False)
    visible, infrared = model.visible_stem, model.infrared_stem
    assert visible.conv1.weight.data_ptr() != infrared.conv1.weight.data_ptr()
    torch.testing.assert_close(visible.conv1.weight, infrared.conv1.weight)
    parameter_ids = {id(p) for p in model.parameters()}
    assert id(visible.conv1.weight) in parameter_ids and id(infrared.conv1.weight) in parameter_ids
    # A visible-only batch trains the visible stem only.
    model.train()
    model(_images(2), 0).sum().backward()
    assert visible.conv1.weight.grad is not None and visible.conv1.weight.grad.abs().sum() > 0
    assert infrared.conv1.weight.grad is None


@pytest.mark.parametrize("depth", [18, 50])
def test_last_stride_one_keeps_layer3_resolution(depth: int) -> None:
    sizes = {}
    for last_stride in (1, 2):
        model = TwoStreamResNet(depth=depth, non_local=False, last_stride=last_stride).eval()
        seen = {}
        model.layer3.register_forward_hook(lambda m, i, o, seen=seen: seen.update(l3=o.shape))
        model.layer4.register_forward_hook(lambda m, i, o, seen=seen: seen.update(l4=o.shape))
        with torch.no_grad():
            model(_images(1), 0)
        sizes[last_stride] = seen
    assert sizes[1]["l4"][2:] == sizes[1]["l3"][2:] == (4, 2)
    assert sizes[2]["l4"][2:] == (2, 1)


@pytest.mark.parametrize("width", ["release", "half"])
def test_non_local_block_is_identity_at_init(width: str) -> None:
    torch.manual_seed(0)
    block = NonLocalBlock(16, width)
    x = torch.randn(2, 16, 5, 3)
    torch.testing.assert_close(block.train()(x), x, rtol=0, atol=0)
    torch.testing.assert_close(block.eval()(x), x, rtol=0, atol=0)


@pytest.mark.parametrize(("width", "inner"), [("release", 1), ("half", 4)])
def test_non_local_block_matches_dot_product_formula(width: str, inner: int) -> None:
    torch.manual_seed(1)
    block = NonLocalBlock(8, width).eval()
    assert block.inner_channels == inner
    assert block.theta.out_channels == block.phi.out_channels == block.g.out_channels == inner
    with torch.no_grad():
        block.output[1].weight.fill_(1.0)  # eval BN with fresh stats (0, 1): ~identity
    x = torch.randn(2, 8, 3, 2, dtype=torch.float64)
    block = block.double()
    num_positions = 6

    def conv1x1(conv: torch.nn.Conv2d, t: torch.Tensor) -> torch.Tensor:
        weight = conv.weight[:, :, 0, 0]
        return torch.einsum("oc,bchw->bohw", weight, t) + conv.bias[None, :, None, None]

    theta = conv1x1(block.theta, x).flatten(2)  # [B, C', N]
    phi = conv1x1(block.phi, x).flatten(2)
    g = conv1x1(block.g, x).flatten(2)
    expected = torch.zeros_like(x)
    for b in range(2):
        # f = theta^T phi / N, no softmax (a softmax would make each row sum to 1)
        affinity = theta[b].T @ phi[b] / num_positions  # [N, N]
        y = (affinity @ g[b].T).T.reshape(-1, 3, 2)  # [C', H, W]
        z = conv1x1(block.output[0], y[None])[0] / (1 + block.output[1].eps) ** 0.5
        expected[b] = x[b] + z
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-12)


def test_default_depth50_parameter_count_and_breakdown(resnet50_model: TwoStreamResNet) -> None:
    """docs/method.md: 23,550,351 = trunk 23,508,032 + second stem 9,536 + non-local 28,687 + neck 4,096."""

    def count(params) -> int:
        return sum(p.numel() for p in params)

    named = dict(resnet50_model.named_parameters())
    groups = {"infrared_stem.": 0, "non_local.": 0, "neck.": 0, "pool.": 0}
    trunk = 0
    for name, p in named.items():
        prefix = next((g for g in groups if name.startswith(g)), None)
        if prefix is None:
            trunk += p.numel()
        else:
            groups[prefix] += p.numel()
    # Trunk (visible stem + layer1-4) = torchvision's ResNet-50 without its fc classifier.
    reference = torchvision.models.resnet50(weights=None)
    assert trunk == count(reference.parameters()) - count(reference.fc.parameters()) == 23_508_032
    # Second stem: conv1 7x7x3 -> 64 without bias, bn1 weight + bias.
    assert groups["infrared_stem."] == 64 * 3 * 7 * 7 + 2 * 64 == 9_536
    # Non-local block on C channels, inner width 1: g, theta, phi (C + 1 each), W conv (C + C), W BN (2C).
    def per_block(c: int) -> int:
        return 3 * (c * 1 + 1) + (1 * c + c) + 2 * c

    assert groups["non_local."] == 2 * per_block(512) + 3 * per_block(1024) == 28_687
    assert groups["neck."] == 2 * 2048 and groups["pool."] == 0
    assert count(resnet50_model.parameters()) == 23_550_351
    # The C/2 switch adds about 7.3 million.
    half = TwoStreamResNet(depth=50, non_local_width="half")
    extra = count(half.parameters()) - 23_550_351
    expected_extra = sum(
        n * ((3 * (c * (c // 2) + c // 2) + (c // 2) * c + c + 2 * c) - per_block(c)) for n, c in ((2, 512), (3, 1024))
    )
    assert extra == expected_extra and 7.2e6 < extra < 7.4e6


def test_non_local_placement_and_identity_in_model(resnet50_model: TwoStreamResNet) -> None:
    assert sorted(resnet50_model.non_local["layer2"].keys()) == ["2", "3"]
    assert sorted(resnet50_model.non_local["layer3"].keys()) == ["3", "4", "5"]
    assert sorted(resnet50_model.non_local.keys()) == ["layer2", "layer3"]

    torch.manual_seed(0)
    with_nl = TwoStreamResNet(depth=18).eval()
    without_nl = TwoStreamResNet(depth=18, non_local=False).eval()
    without_nl.load_state_dict(
        {k: v for k, v in with_nl.state_dict().items() if not k.startswith("non_local.")}
    )
    images = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(with_nl(images, 1), without_nl(images, 1))
        # The blocks are on the forward path: once their output BN is non-zero, it changes.
        with_nl.non_local["layer3"]["1"].output[1].weight.fill_(1.0)
        assert (with_nl(images, 1) - without_nl(images, 1)).abs().max() > 1e-3


def test_gem_pooling() -> None:
    x = torch.rand(2, 3, 4, 5) + 0.1
    # Learnable (AGW's GeneralizedMeanPoolingP, the model.gem_learnable switch).
    learnable = GeneralizedMeanPooling(p=3.0, learnable=True)
    torch.testing.assert_close(learnable(x), (x**3).mean(dim=(2, 3)) ** (1 / 3))
    assert isinstance(learnable.p, torch.nn.Parameter)
    average = GeneralizedMeanPooling(p=1.0)
    torch.testing.assert_close(average(x), x.mean(dim=(2, 3)))


def test_gem_fixed_p3_is_the_release_formula_and_has_no_state() -> None:
    torch.manual_seed(0)
    model = TwoStreamResNet(depth=18, non_local=False)
    pool = model.pool
    assert pool.p == 3.0 and not pool.learnable
    assert not list(pool.parameters()) and not list(pool.buffers()) and not pool.state_dict()
    assert not any(name.startswith("pool.") for name in model.state_dict())
    # ReLU output with exact zeros: the release adds 1e-12 after the mean, no clamp.
    x = torch.relu(torch.randn(2, 4, 3, 5, dtype=torch.float64))
    x[1, 2] = 0.0  # an all-zero channel pools to (1e-12) ** (1/3) = 1e-4
    expected = torch.empty(2, 4, dtype=torch.float64)
    for b in range(2):
        for c in range(4):
            values = [float(v) for v in x[b, c].flatten()]
            expected[b, c] = (sum(v**3 for v in values) / len(values) + 1e-12) ** (1 / 3)
    torch.testing.assert_close(pool(x), expected, rtol=1e-12, atol=0)
    assert abs(float(pool(x)[1, 2]) - 1e-4) < 1e-12


def test_bn_neck_init_and_frozen_bias() -> None:
    torch.manual_seed(0)
    model = TwoStreamResNet(depth=50, non_local=False)
    weight = model.neck.weight.detach()
    assert not model.neck.bias.requires_grad and model.neck.weight.requires_grad
    assert torch.equal(model.neck.bias, torch.zeros(2048))
    # weight ~ N(1, 0.01): 2048 draws, so mean within 5 standard errors, std within 10 %.
    assert abs(float(weight.mean()) - 1.0) < 5 * 0.01 / 2048**0.5
    assert 0.009 < float(weight.std()) < 0.011
    assert not torch.equal(weight, torch.ones(2048))  # not the plain ones init
    assert torch.equal(model.neck.running_mean, torch.zeros(2048))
    assert torch.equal(model.neck.running_var, torch.ones(2048))


def test_channels_last_and_inference_mode() -> None:
    model = _perturbed_depth18()
    images = _images(3)
    modality = torch.tensor([0, 1, 1])
    with torch.no_grad():
        reference = model(images, modality)
    model = model.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = model(images.contiguous(memory_format=torch.channels_last), modality)
    assert out.shape == (3, 512)
    torch.testing.assert_close(out, reference, rtol=1e-3, atol=1e-3)


def test_invalid_modality_rejected() -> None:
    model = TwoStreamResNet(depth=18, non_local=False).eval()
    with pytest.raises(ValueError, match="modality"):
        model(_images(2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="modality"):
        model(_images(2), 3)


def test_build_model_and_signature() -> None:
    model = build_model(depth=18, non_local=False)
    assert isinstance(model, TwoStreamResNet)
    assert model_signature(model) == {
        "depth": 18, "width": 64, "last_stride": 1, "non_local": False, "non_local_width": None, "gem_learnable": False,
        "feat_dim": 512,
    }
    half = build_model(depth=18, non_local=True, non_local_width="half", gem_learnable=True)
    assert model_signature(half) == {
        "depth": 18, "width": 64, "last_stride": 1, "non_local": True, "non_local_width": "half", "gem_learnable": True,
        "feat_dim": 512,
    }
    cfg = ModelConfig(depth=18, non_local=True, non_local_width="half", pretrained="none")
    assert model_signature(model_from_config(cfg)) == dict(model_signature(half), gem_learnable=False)
    with pytest.raises(ConfigError, match="model.non_local_width"):
        build_model(depth=18, non_local_width="quarter")


def test_half_width_checkpoint_refused_by_release_width_config(tmp_path) -> None:
    from bmil.engine.run import check_signature

    torch.manual_seed(0)
    half = build_model(depth=18, non_local=True, non_local_width="half")
    release = build_model(depth=18, non_local=True)
    state = {"model": half.state_dict(), "signature": model_signature(half)}
    with pytest.raises(CheckpointError, match="half"):
        check_signature(model_signature(release), state, tmp_path / "half.pt")
    check_signature(model_signature(half), state, tmp_path / "half.pt")  # a matching config loads
    with pytest.raises(RuntimeError, match="size mismatch"):  # and the weights could not fit anyway
        release.load_state_dict(state["model"])
    assert bmil_config.load_config(None, ["model.non_local_width=half"]).model.non_local_width == "half"
    with pytest.raises(ConfigError, match="model.non_local_width"):
        bmil_config.load_config(None, ["model.non_local_width=quarter"])


@pytest.mark.parametrize("depth", [18, 50])
def test_narrow_width_is_torchvision_resnet_with_every_channel_count_halved(depth: int) -> None:
    torchvision_state = torchvision.models.get_model(f"resnet{depth}").state_dict()
    reference = {name: tuple(v.shape) for name, v in torchvision_state.items() if not name.startswith("fc.")}
    model = TwoStreamResNet(depth=depth, non_local=False, width=32)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, shape in reference.items():
        key = "visible_stem." + name if name.startswith(("conv1.", "bn1.")) else name
        if not shape:  # num_batches_tracked
            assert own[key] == shape, key
            continue
        halved = tuple(size // 2 if axis < 2 else size for axis, size in enumerate(shape))
        if name == "conv1.weight":
            halved = (shape[0] // 2, 3, *shape[2:])  # the image keeps its 3 channels
        assert own[key] == halved, key
    trunk = {k for k in own if k.startswith("layer")}
    assert trunk == {k for k in reference if k.startswith("layer")}  # no block added or dropped
    assert model.feat_dim == reference["layer4.1.bn2.weight" if depth == 18 else "layer4.2.bn3.weight"][0] // 2
    assert model(_images(2), torch.tensor([0, 1])).shape == (2, model.feat_dim)


def test_narrow_width_initialised_as_torchvision() -> None:
    torch.manual_seed(0)
    model = TwoStreamResNet(depth=18, non_local=False, width=16)
    conv = model.layer3[0].conv2.weight  # [64, 64, 3, 3]: He normal, fan-out = 64 * 9
    assert abs(conv.std().item() - (2 / (64 * 9)) ** 0.5) < 0.1 * (2 / (64 * 9)) ** 0.5
    assert abs(conv.mean().item()) < 0.01
    assert torch.equal(model.layer2[1].bn1.weight, torch.ones(32))
    assert torch.equal(model.layer2[1].bn1.bias, torch.zeros(32))


def test_width_64_is_torchvision_resnet_unchanged() -> None:
    torch.manual_seed(5)
    model = TwoStreamResNet(depth=18, non_local=False)
    torch.manual_seed(5)
    reference = torchvision.models.resnet18(weights=None).state_dict()
    _assert_holds_resnet_weights(model, reference)


def test_width_errors_and_checkpoint_refusal(tmp_path) -> None:
    from bmil.engine.run import check_signature

    with pytest.raises(ConfigError, match="model.width"):
        build_model(depth=18, width=4)
    with pytest.raises(ConfigError, match="model.width 32 has no pretrained weights"):
        build_model(depth=18, width=32, pretrained="imagenet")
    narrow = build_model(depth=18, non_local=False, width=32)
    state = {"model": narrow.state_dict(), "signature": model_signature(narrow)}
    with pytest.raises(CheckpointError, match="'width': 32"):
        check_signature(model_signature(build_model(depth=18, non_local=False)), state, tmp_path / "n.pt")
    check_signature(model_signature(narrow), state, tmp_path / "n.pt")
    # a checkpoint written before the width was recorded is held to the facts it states
    older = {k: v for k, v in model_signature(build_model(depth=18, non_local=False)).items() if k != "width"}
    check_signature(model_signature(build_model(depth=18, non_local=False)), {"signature": older}, tmp_path / "o.pt")
    cfg = bmil_config.load_config(None, ["model.width=32", "model.pretrained=none", "model.depth=18"])
    assert model_from_config(cfg.model).feat_dim == 256


def test_last_stride_from_config_and_checkpoint_refusal(tmp_path) -> None:
    from bmil.engine.run import check_signature

    cfg = bmil_config.load_config(None, ["model.last_stride=2", "model.pretrained=none", "model.depth=18"])
    model = model_from_config(cfg.model).eval()
    seen = {}
    model.layer4.register_forward_hook(lambda m, i, o: seen.update(l4=o.shape))
    with torch.no_grad():
        model(_images(1), 0)
    assert seen["l4"][2:] == (2, 1)  # 64×32 input: stride 32 instead of 16
    state = {"signature": model_signature(model)}
    with pytest.raises(CheckpointError, match="'last_stride': 2"):
        check_signature(model_signature(build_model(depth=18)), state, tmp_path / "s.pt")
    with pytest.raises(ConfigError, match="model.last_stride"):
        build_model(depth=18, last_stride=3)


# --- pretrained weights ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    return torchvision.models.resnet18(weights=None).state_dict()


def _assert_holds_resnet_weights(model: TwoStreamResNet, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        if key.startswith(("conv1.", "bn1.")):
            assert torch.equal(loaded["visible_stem." + key], value), key
            assert torch.equal(loaded["infrared_stem." + key], value), key
        else:
            assert torch.equal(loaded[key], value), key


def test_load_state_dict_file(tmp_path, resnet18_state) -> None:
    path = tmp_path / "r18.pth"
    torch.save(resnet18_state, path)
    model = TwoStreamResNet(depth=18, pretrained=str(path))
    _assert_holds_resnet_weights(model, resnet18_state)
    # Stems got copies, not shared storage.
    assert model.visible_stem.conv1.weight.data_ptr() != model.infrared_stem.conv1.weight.data_ptr()

    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in resnet18_state.items()}}, wrapped)
    _assert_holds_resnet_weights(TwoStreamResNet(depth=18, pretrained=wrapped), resnet18_state)


def test_wrong_depth_file_gives_clear_error(tmp_path, resnet18_state) -> None:
    path = tmp_path / "r18.pth"
    torch.save(resnet18_state, path)
    with pytest.raises(CheckpointError, match=r"r18\.pth.*resnet50 state dict"):
        TwoStreamResNet(depth=50, pretrained=path)
    deeper = dict(resnet18_state, **{"layer1.2.conv1.weight": torch.zeros(64, 64, 3, 3)})
    torch.save(deeper, tmp_path / "deeper.pth")
    with pytest.raises(CheckpointError, match=r"deeper\.pth.*layer1\.2\.conv1\.weight"):
        TwoStreamResNet(depth=18, pretrained=tmp_path / "deeper.pth")
    reshaped = dict(resnet18_state, **{"layer2.0.conv1.weight": torch.zeros(128, 64, 1, 1)})
    torch.save(reshaped, tmp_path / "reshaped.pth")
    with pytest.raises(CheckpointError, match=r"reshaped\.pth.*layer2\.0\.conv1\.weight"):
        TwoStreamResNet(depth=18, pretrained=tmp_path / "reshaped.pth")


def test_missing_or_corrupt_file(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="nothere.pth"):
        TwoStreamResNet(depth=18, pretrained=tmp_path / "nothere.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt.pth"):
        TwoStreamResNet(depth=18, pretrained=corrupt)


def test_imagenet_from_hub_cache_or_clear_error(tmp_path, monkeypatch, resnet18_state) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    file_name = imagenet_weights_file(18)
    assert file_name == "resnet18-f37072fd.pth"
    with pytest.raises(CheckpointError) as error:
        TwoStreamResNet(depth=18, pretrained="imagenet")
    message = str(error.value)
    assert file_name in message and str(tmp_path / "checkpoints") in message
    assert "model.pretrained=" in message

    (tmp_path / "checkpoints").mkdir()
    torch.save(resnet18_state, tmp_path / "checkpoints" / file_name)
    model = TwoStreamResNet(depth=18, pretrained="imagenet")
    _assert_holds_resnet_weights(model, resnet18_state)
