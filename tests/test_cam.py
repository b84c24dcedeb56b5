"""Eigen-CAM on top of grad-cam: sign correction, scaling, hooks and modes restored, statistics, tables, figure."""
import math
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from mcmi_lab.figures import cam
from mcmi_lab.data.core import from_tensors
from mcmi_lab.models import build_model, cam_layer


def tiny_cnn(seed: int = 0, classes: int = 3, channels: int = 1, stride: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, stride=stride), nn.BatchNorm2d(6), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, classes))


class NegatedPermuted(nn.Module):
    """The wrapped stage's activations negated and with channels permuted: the same principal subspace."""

    def __init__(self, stage: nn.Module, perm: torch.Tensor):
        super().__init__()
        self.stage, self.perm = stage, perm

    def forward(self, x):
        return -self.stage(x)[:, self.perm]


class Raises(nn.Module):
    def __init__(self, error: type):
        super().__init__()
        self.error = error

    def forward(self, x):
        raise self.error("boom")


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def reference_maps(activations: torch.Tensor) -> torch.Tensor:
    """Plain Eigen-CAM: first principal component of centred (hw, C) activations, flipped when |min| > |max|,
    clipped at 0, min-max scaled."""
    out = []
    for a in activations.double():
        m = a.flatten(1).T
        m = m - m.mean(dim=0)
        _, _, vh = torch.linalg.svd(m, full_matrices=False)
        p = m @ vh[0]
        if p.min().abs() > p.max().abs():
            p = -p
        p = p.clamp_min(0)
        p = (p - p.min()) / (p.max() - p.min())
        out.append(p.view(a.shape[1:]))
    return torch.stack(out).float()


# ---- maps -------------------------------------------------------------------------------------------------------

def test_maps_match_plain_reference_and_stock_eigencam_needs_the_sign_fix():
    from pytorch_grad_cam import EigenCAM

    model = tiny_cnn().eval()
    x = torch.randn(16, 1, 10, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # stage output keeps the input resolution, so grad-cam's resize is the identity
        acts = model[2](model[1](model[0](x)))
    maps = cam.eigen_cams(model, x, target_layer="2")
    ref = reference_maps(acts)
    torch.testing.assert_close(maps, ref, atol=1e-4, rtol=0)
    with EigenCAM(model, [model[2]]) as stock:
        unsigned = torch.from_numpy(stock(x, targets=None))
    assert (unsigned - ref).abs().amax(dim=(1, 2)).max() > 0.1  # without the fix some maps come out inverted


def test_negated_twin_gives_the_same_map():
    from pytorch_grad_cam import EigenCAM

    model = tiny_cnn().eval()
    twin_stage = NegatedPermuted(model[2], torch.randperm(6, generator=torch.Generator().manual_seed(0)))
    twin = nn.Sequential(model[0], model[1], twin_stage, *model[3:])
    x = torch.randn(24, 1, 10, 10, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(cam.eigen_cams(model, x), cam.eigen_cams(twin, x, "2"), atol=1e-5, rtol=0)
    with EigenCAM(model, [model[2]]) as a, EigenCAM(twin, [twin_stage]) as b:
        stock = torch.from_numpy(a(x, targets=None)) - torch.from_numpy(b(x, targets=None))
    assert stock.abs().amax() > 0.1  # the twin does tell an uncorrected sign apart


def test_maps_min_max_scaled_at_input_resolution_and_chunking_is_invisible():
    model = tiny_cnn(stride=2)
    x = torch.randn(7, 1, 12, 14)
    maps = cam.eigen_cams(model, x)
    assert maps.shape == (7, 12, 14) and maps.dtype == torch.float32 and maps.device.type == "cpu"
    torch.testing.assert_close(maps.amin(dim=(1, 2)), torch.zeros(7))
    torch.testing.assert_close(maps.amax(dim=(1, 2)), torch.ones(7), atol=1e-5, rtol=0)
    torch.testing.assert_close(cam.eigen_cams(model, x, batch_size=3), maps)


def test_train_mode_restored_per_module():
    model = tiny_cnn().train()
    model[2][1].eval()  # a frozen BatchNorm must stay frozen
    cam.eigen_cams(model, torch.randn(2, 1, 8, 8))
    assert model.training and model[2].training and not model[2][1].training
    model.eval()
    cam.eigen_cams(model, torch.randn(2, 1, 8, 8))
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("error", [IndexError, RuntimeError])
def test_hooks_released_and_mode_restored_after_an_error(error):
    model = tiny_cnn()
    model[4] = Raises(error)  # after the target layer: grad-cam's hooks are in place when it fails
    model.train()
    with pytest.raises(error):  # grad-cam's own context manager would print and swallow the IndexError
        cam.eigen_cams(model, torch.randn(2, 1, 8, 8))
    assert no_hooks(model) and all(m.training for m in model.modules())


def test_hooks_released_after_success():
    model = tiny_cnn()
    cam.eigen_cams(model, torch.randn(2, 1, 8, 8))
    assert no_hooks(model)


def test_target_layer_by_name_or_module_and_bad_layers():
    model = tiny_cnn().eval()
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(cam.eigen_cams(model, x, "2.0"), cam.eigen_cams(model, x, model[2][0]))
    with pytest.raises(ValueError, match="target_layer='nope'"):
        cam.eigen_cams(model, x, "nope")
    with pytest.raises(ValueError, match="submodule"):
        cam.eigen_cams(model, x, nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="B, C, h, w"):
        cam.eigen_cams(model, x, "5")  # the Linear head
    assert no_hooks(model)
    with pytest.raises(ValueError, match="images"):
        cam.eigen_cams(model, torch.randn(1, 8, 8))


def test_default_layer_fallback_and_zoo_rule(monkeypatch):
    model = tiny_cnn()  # not a zoo model: the last top-level child holding a Conv2d
    assert cam.default_target_layer(model) == "2"
    with pytest.raises(ValueError, match="without target_layer"):
        cam.default_target_layer(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    zoo = build_model("resnet8", 10, 3)  # a zoo model: the layer models.cam_layer names
    assert cam.default_target_layer(zoo) == cam_layer(zoo)
    monkeypatch.setattr(cam, "cam_layer", lambda m: "0")
    assert cam.default_target_layer(model) == "0"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model = tiny_cnn().eval()
    x = torch.randn(4, 1, 10, 10)
    gpu = cam.eigen_cams(model.cuda(), x.cuda())
    torch.testing.assert_close(gpu, cam.eigen_cams(model.cpu(), x), atol=1e-3, rtol=0)


# ---- statistics -------------------------------------------------------------------------------------------------

def brute_statistics(m: torch.Tensor, mask: torch.Tensor) -> dict:
    values = [float(v) for v in m.flatten()]
    inside = [bool(v) for v in mask.flatten()]
    total, peak = sum(values), max(values)
    p = [v / total for v in values]
    ent = -sum(q * math.log(q) for q in p if q > 0)
    return {"area_above_half": sum(v >= peak / 2 for v in values) / len(values), "entropy": ent,
            "entropy_norm": ent / math.log(len(values)),
            "mass_inside": sum(q for q, i in zip(p, inside) if i),
            "mass_outside": sum(q for q, i in zip(p, inside) if not i), "mask_area": sum(inside) / len(inside)}


def test_statistics_on_hand_made_maps():
    h, w = 4, 5
    one = torch.zeros(h, w)
    one[1, 2] = 1.0
    uniform = torch.full((h, w), 0.3)
    empty = torch.zeros(h, w)
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[:2] = True  # 10 of 20 pixels, contains the bright pixel
    stats = cam.cam_statistics(torch.stack([one, uniform, empty]), torch.stack([mask] * 3))
    assert stats["area_above_half"].tolist() == [1 / (h * w), 1.0, 1.0]
    torch.testing.assert_close(stats["entropy"], torch.tensor([0.0, math.log(h * w), math.log(h * w)],
                                                              dtype=torch.float64))
    torch.testing.assert_close(stats["entropy_norm"], torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(stats["mass_inside"], torch.tensor([1.0, 0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(stats["mass_outside"], torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64))
    assert stats["mask_area"].tolist() == [0.5, 0.5, 0.5]


def test_statistics_match_brute_force():
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(5, 6, 7, generator=g) ** 3
    masks = torch.rand(5, 6, 7, generator=g) > 0.6
    stats = cam.cam_statistics(maps, masks)
    for i in range(5):
        for key, value in brute_statistics(maps[i], masks[i]).items():
            assert float(stats[key][i]) == pytest.approx(value, abs=1e-9), key


def test_statistics_reject_bad_input():
    with pytest.raises(ValueError, match="negative"):
        cam.cam_statistics(-torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="maps of shape"):
        cam.cam_statistics(torch.ones(2, 2))
    with pytest.raises(ValueError, match="masks of shape"):
        cam.cam_statistics(torch.ones(1, 2, 2), torch.ones(1, 3, 2))


def test_object_masks():
    raw = torch.tensor([[[[0, 12, 13, 255]]]], dtype=torch.uint8)  # 12/255 < 0.05 < 13/255
    assert cam.object_masks(raw).tolist() == [[[False, False, True, True]]]
    assert cam.object_masks(raw.float() / 255, 0.5).tolist() == [[[False, False, False, True]]]
    assert cam.object_masks(raw[:, 0]).shape == (1, 1, 4)
    rgb = torch.zeros(1, 3, 1, 2)
    rgb[0, 2, 0, 1] = 0.9
    assert cam.object_masks(rgb).tolist() == [[[False, True]]]
    with pytest.raises(ValueError, match="threshold"):
        cam.object_masks(raw, 2.0)


def test_summarize_cams_per_class_and_overall():
    stats = {"a": torch.tensor([1.0, 2.0, 3.0, 5.0]), "b": torch.tensor([0.0, 1.0, 1.0, 1.0])}
    rows = cam.summarize_cams(stats, torch.tensor([2, 0, 2, 2]), ["x", "y", "z"])
    assert rows == [{"class": "x", "n": 1, "a": 2.0, "b": 1.0},
                    {"class": "z", "n": 3, "a": 3.0, "b": 2 / 3},
                    {"class": "all", "n": 4, "a": 2.75, "b": 0.75}]
    text = cam.format_cam_table(rows)
    assert text.splitlines()[0].split() == ["class", "n", "a", "b"] and "2.750" in text
    with pytest.raises(ValueError, match="stats\\['a'\\]"):
        cam.summarize_cams(stats, torch.tensor([0, 1]))


# ---- several models ---------------------------------------------------------------------------------------------

def tiny_data(n: int = 6, channels: int = 1):
    g = torch.Generator().manual_seed(5)
    images = torch.zeros(n, channels, 10, 10, dtype=torch.uint8)
    images[:, :, 2:8, 3:7] = torch.randint(60, 255, (n, channels, 6, 4), generator=g, dtype=torch.uint8)
    return from_tensors(images, torch.arange(n) % 3, ["tee", "bag", "boot"])


def test_compare_cams_table():
    data = tiny_data()
    models = {"MLL": tiny_cnn(0), "MCMI": tiny_cnn(1)}
    maps, rows = cam.compare_cams(models, data, [0, 1, 2, 4])
    assert list(maps) == ["MLL", "MCMI"] and maps["MLL"].shape == (4, 10, 10)
    assert [(r["model"], r["class"], r["n"]) for r in rows] == [
        (m, c, n) for m in ("MLL", "MCMI") for c, n in (("tee", 1), ("bag", 2), ("boot", 1), ("all", 4))]
    masks = cam.object_masks(data.images[[0, 1, 2, 4]])
    expected = cam.cam_statistics(maps["MCMI"], masks)["mass_inside"].mean()
    assert rows[-1]["mass_inside"] == pytest.approx(float(expected))
    with torch.no_grad():
        pred = models["MLL"].eval()(data.normalize(data.images[[0, 1, 2, 4]])).argmax(1)
    assert rows[3]["accuracy"] == pytest.approx(float((pred == data.labels[[0, 1, 2, 4]]).double().mean()))
    _, rows_rgb = cam.compare_cams({"A": tiny_cnn(channels=3)}, tiny_data(channels=3), [0, 1])
    assert "mass_inside" not in rows_rgb[0]  # "auto": no object masks for colour images


def test_plot_cam_grid_gray_and_colour(tmp_path):
    data = tiny_data()
    models = {"MLL": tiny_cnn(0).train(), "MCMI": tiny_cnn(1)}
    x = data.normalize(data.images[:3])
    fig = cam.plot_cam_grid(x, models, data=data, labels=data.labels[:3], masks=cam.object_masks(data.images[:3]),
                            path=tmp_path / "grid.png")
    assert isinstance(fig, Figure) and len(fig.axes) == 3 * 3 + 1  # and the colorbar, which says what H is
    assert "H: normalised entropy" in fig.axes[-1].get_xlabel() and "in: CAM mass inside" in fig.axes[-1].get_xlabel()
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "tee" and titles[1].startswith("MLL → ") and "area" in titles[2] and " in " in titles[2]
    assert fig.axes[0].images[0].get_cmap().name == "gray"
    assert models["MLL"].training and no_hooks(models["MLL"])
    assert os.listdir(tmp_path) == ["grid.png"]
    rgb = tiny_data(channels=3)
    fig = cam.plot_cam_grid(rgb.images[:2], {"A": tiny_cnn(channels=3)}, data=rgb)  # uint8: normalised with data
    assert len(fig.axes) == 4 + 1 and fig.axes[0].images[0].get_array().shape == (10, 10, 3)
    with pytest.raises(ValueError, match="uint8"):
        cam.plot_cam_grid(rgb.images[:2], {"A": tiny_cnn(channels=3)})


def test_de_normalised_display_recovers_the_raw_image():
    data = tiny_data()
    shown = cam._display_images(data.normalize(data.images[:2]), data)
    torch.testing.assert_close(shown[..., 0], data.images[:2, 0].float() / 255, atol=1e-6, rtol=0)
    shown = cam._display_images(data.normalize(data.images[:2]), (data.mean, data.std))
    torch.testing.assert_close(shown[..., 0], data.images[:2, 0].float() / 255, atol=1e-6, rtol=0)
