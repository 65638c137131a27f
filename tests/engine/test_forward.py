"""The training forward (engine/forward.py) against forwards computed by hand: each
modality's rows through its own stem and the shared trunk, ``bn_split`` passes equal to
separate forwards of the chunks, labels laid out view-major, BatchNorm statistics frozen
where asked."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bmil.engine.forward import forward_batches, network_features, running_stats_frozen
from bmil.model import TwoStreamResNet
from bmil.records import INFRARED, VISIBLE

CPU = torch.device("cpu")
TRUNK = ("layer1", "layer2", "layer3", "layer4")


@pytest.fixture(scope="module")
def network() -> TwoStreamResNet:
    """Depth 18, no non-local blocks, an infrared stem unlike the visible one."""
    torch.manual_seed(0)
    model = TwoStreamResNet(depth=18, non_local=False)
    with torch.no_grad():
        model.infrared_stem.conv1.weight.mul_(-0.5)
        model.infrared_stem.bn1.running_mean.fill_(0.3)
        model.infrared_stem.bn1.running_var.fill_(2.0)
    return model


def _by_hand(model: TwoStreamResNet, stem: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """n(neck(pool(layer4(…layer1(stem(x)))))): one stem, then the shared trunk, unit rows."""
    x = stem(x)
    for name in TRUNK:
        x = getattr(model, name)(x)
    return F.normalize(model.neck(model.pool(x)), dim=1)


def _batches(b_visible: int, b_infrared: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    visible = torch.randn(b_visible, 2, 3, 32, 16, generator=g)
    infrared = torch.randn(b_infrared, 1, 3, 32, 16, generator=g)
    visible_index = torch.randperm(10, generator=g)[:b_visible]
    infrared_index = torch.randperm(10, generator=g)[:b_infrared]
    return {VISIBLE: (visible, visible_index), INFRARED: (infrared, infrared_index)}


def _view_major(views: torch.Tensor) -> torch.Tensor:
    """[B, V, 3, H, W] → [V·B, 3, H, W]: every first view, then every second."""
    return torch.cat([views[:, v] for v in range(views.shape[1])])


def test_each_modality_goes_through_its_own_stem_and_the_shared_trunk(network):
    model = network.eval()
    batches = _batches(3, 2)
    labels = {VISIBLE: np.arange(10) + 100, INFRARED: np.arange(10) + 200}
    with torch.no_grad():
        out = forward_batches(model, batches, labels, CPU)
        for m, own, other in ((VISIBLE, model.visible_stem, model.infrared_stem),
                              (INFRARED, model.infrared_stem, model.visible_stem)):
            x = _view_major(batches[m][0])
            torch.testing.assert_close(out[m].features, _by_hand(model, own, x), atol=1e-5, rtol=1e-4)
            # The other stem gives other features: the comparison can tell the routes apart.
            assert (out[m].features - _by_hand(model, other, x)).abs().max() > 1e-2
    assert list(out) == [VISIBLE, INFRARED]
    for m, (views, index) in batches.items():
        assert out[m].features.dtype == torch.float32 and out[m].features.shape == (len(index) * views.shape[1], 512)
        assert out[m].views == views.shape[1] and out[m].index is index
        # Each row's label: its image's, repeated over the views in the view-major layout.
        expected = np.concatenate([labels[m][index.numpy()]] * views.shape[1])
        assert out[m].targets.tolist() == expected.tolist()


def test_bn_split_passes_equal_separate_forwards_of_the_chunks(network):
    """Training mode, bn_split=2: pass j is the j-th half of every modality's view-major
    rows through the network alone (each pass normalised with its own batch statistics);
    the running statistics are those of pass 0 alone."""
    model = copy.deepcopy(network).train()
    only_first = copy.deepcopy(network).train()
    reference = copy.deepcopy(network).train()
    batches = _batches(4, 4, seed=1)
    labels = {m: np.zeros(10, dtype=np.int64) for m in (VISIBLE, INFRARED)}
    rows = {m: _view_major(batches[m][0]) for m in (VISIBLE, INFRARED)}  # 8 visible, 4 infrared
    with torch.no_grad():
        out = forward_batches(model, batches, labels, CPU, bn_split=2)
        expected = {VISIBLE: [], INFRARED: []}
        for j in range(2):
            x = torch.cat([rows[VISIBLE][4 * j:4 * j + 4], rows[INFRARED][2 * j:2 * j + 2]])
            mods = torch.tensor([VISIBLE] * 4 + [INFRARED] * 2)
            f = F.normalize(reference(x, mods), dim=1)
            expected[VISIBLE].append(f[:4])
            expected[INFRARED].append(f[4:])
            if j == 0:
                only_first(x, mods)
    for m in (VISIBLE, INFRARED):
        torch.testing.assert_close(out[m].features, torch.cat(expected[m]), atol=1e-5, rtol=1e-4)
    buffers = dict(only_first.named_buffers())
    for name, value in model.named_buffers():
        torch.testing.assert_close(value, buffers[name], atol=1e-6, rtol=1e-5, msg=name)
    assert int(model.neck.num_batches_tracked) == int(network.neck.num_batches_tracked) + 1


def test_frozen_running_statistics_are_left_and_the_flags_restored():
    norm = nn.BatchNorm1d(3).train()
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    x = torch.randn(5, 3) * 3 + 2
    with running_stats_frozen(norm):
        y = norm(x)
    assert norm.track_running_stats
    assert all(torch.equal(v, before[k]) for k, v in norm.state_dict().items())
    by_hand = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + norm.eps)  # the batch's own statistics
    torch.testing.assert_close(y, by_hand, atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError), running_stats_frozen(norm):
        raise RuntimeError
    assert norm.track_running_stats


def test_network_features_are_unit_float32_rows(network):
    model = network.eval()
    x = torch.randn(3, 3, 32, 16)
    modality = torch.tensor([INFRARED, VISIBLE, INFRARED])
    with torch.no_grad():
        f = network_features(model, x, modality, CPU)
        raw = model(x, modality)
    assert f.dtype == torch.float32 and f.shape == (3, 512)
    torch.testing.assert_close(f, raw / raw.norm(dim=1, keepdim=True), atol=1e-6, rtol=1e-5)
