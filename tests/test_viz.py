"""Grad-CAM, lung mask, hand-made kernels, figures, `covidct viz` and the shortcut check."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

import minicnn as mc
from covidct import COVID
from covidct.cli import main
from covidct.gradcam import default_layer_index, feature_maps, gradcam, lung_mask, mass_by_distance, mass_inside
from covidct.model import build_model, preset
from covidct.preprocess import Preprocess, load_image, to_gray
from covidct.synthetic import make_slice, write_dataset
from covidct.train import TrainConfig, train
from covidct import viz
from pictures import assert_picture

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path):
    assert_picture(path)                   # raises, naming the problem, if blank, tiny or not a PNG
    return True


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model trained for one epoch on a small synthetic dataset -> (data root, checkpoint)."""
    root = tmp_path_factory.mktemp("viz")
    data = write_dataset(root / "data", n=40, size=32)
    train(TrainConfig(data=str(data), model="tiny", epochs=1, batch_size=8, progress=False, out=str(root / "run"),
                      cache_dir=str(root / "cache"), lungs="none"), log=lambda *args: None)
    return data, root / "run" / "best.npz"


def tiny_model():
    return build_model(preset("tiny"), seed=3)


# ------------------------------------------------------------------ Grad-CAM
def test_gradcam_shape_range_and_no_side_effects():
    model = tiny_model().train()
    x = np.random.default_rng(0).standard_normal((5, 1, 32, 32)).astype(np.float32)
    before = {name: value.copy() for name, value in model.state_dict().items()}
    sentinel = np.full(model[0].bias.shape, 7.0, np.float32)
    model[0].bias.grad = sentinel                      # a caller's accumulated gradient survives
    heatmaps, logits = gradcam(model, x, return_logits=True)
    assert heatmaps.shape == (5, 32, 32) and heatmaps.dtype == np.float32 and logits.shape == (5, 2)
    assert heatmaps.min() >= 0 and heatmaps.max() <= 1 and np.isclose(heatmaps.max(), 1)
    assert model[0].bias.grad is sentinel and np.all(sentinel == 7)
    assert all(p.grad is None for name, p in model.named_parameters() if name != "0.bias")
    assert all(np.array_equal(before[name], value) for name, value in model.state_dict().items())
    assert model.training                              # the caller's mode is restored
    model.eval()                                       # same logits as a plain eval forward (dropout off)
    assert np.allclose(logits, model(x), atol=1e-5)
    assert np.allclose(gradcam(model, x, target_class=np.array([0, 1, 0, 1, 0]))[1], heatmaps[1], atol=1e-6)


def test_default_layer_is_the_last_conv_relu():
    assert default_layer_index(tiny_model()) == 4      # conv relu pool conv [relu] pool flatten ...
    deep = preset("deep")
    deep.input_size = 32
    deep_model = build_model(deep)
    index = default_layer_index(deep_model)
    assert isinstance(deep_model[index], mc.ReLU) and isinstance(deep_model[index - 1], mc.BatchNorm2d)
    assert isinstance(deep_model[index + 2], mc.AdaptiveAvgPool2d)
    assert gradcam(deep_model, np.ones((2, 1, 32, 32), np.float32)).shape == (2, 32, 32)



def test_gradcam_of_an_ensemble_is_the_mean_of_its_members():
    from covidct.ensemble import Ensemble
    members = [build_model(preset("tiny"), seed=seed).eval() for seed in (1, 2)]
    normalizations = [(0.5, 0.25), (0.1, 2.0)]
    x = np.random.default_rng(1).random((3, 1, 32, 32), dtype=np.float32)      # [0, 1], as an ensemble takes it

    def rescaled(total):
        return total / total.max(axis=(1, 2), keepdims=True)

    alone = [gradcam(m, (x - np.float32(mean)) / np.float32(std)) for m, (mean, std) in zip(members, normalizations)]
    ensemble = Ensemble(members, normalizations).eval()
    heatmaps, logits = gradcam(ensemble, x, return_logits=True)
    assert np.allclose(heatmaps, rescaled(alone[0] + alone[1]), atol=1e-6)
    assert np.allclose(logits, ensemble(x), atol=1e-6)
    mirror = x[..., ::-1].copy()
    mirrored = [gradcam(m, (mirror - np.float32(mean)) / np.float32(std))[..., ::-1]
                for m, (mean, std) in zip(members, normalizations)]
    with_tta = gradcam(Ensemble(members, normalizations, tta=True), x)
    assert np.allclose(with_tta, rescaled(sum(alone) + sum(mirrored)), atol=1e-6)
    assert not np.allclose(with_tta, heatmaps, atol=1e-3)
    first = feature_maps(members[0], (x - np.float32(0.5)) / np.float32(0.25))
    shown = feature_maps(ensemble, x)
    assert [name for name, _ in shown] == [f"member0.{name}" for name, _ in first]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(shown, first))

def left_half_model(size=16):
    """Channel 0 detects bright spots, channel 1 dark spots; the COVID logit reads channel 0 in the
    LEFT half of the image only, and nothing else."""
    conv = mc.Conv2d(1, 2, 3, padding=1)
    conv.weight.data = np.stack([np.full((3, 3), 1 / 9), np.full((3, 3), -1 / 9)])[:, None].astype(np.float32)
    conv.bias.data = np.array([-0.6, 0.4], np.float32)
    half = size // 2
    head = mc.Linear(2 * half * half, 2)
    weights = np.zeros((2, 2, half, half), np.float32)
    weights[1, 0, :, :half // 2] = 1.0                  # class 1, channel 0, left columns
    head.weight.data = weights.reshape(2, -1)
    head.bias.data = np.zeros(2, np.float32)
    return mc.Sequential(conv, mc.ReLU(), mc.MaxPool2d(2), mc.Flatten(), head).eval()


def test_gradcam_puts_the_mass_where_the_model_looks():
    size = 16
    model = left_half_model(size)
    images = np.full((3, 1, size, size), 0.5, np.float32)
    rng = np.random.default_rng(0)
    for image in images:
        y, x = rng.integers(3, size - 5), rng.integers(1, size // 2 - 4)
        image[0, y:y + 3, x:x + 3] = 1.0                # bright: read by the model (left half)
        y, x = rng.integers(3, size - 5), rng.integers(size // 2 + 1, size - 4)
        image[0, y:y + 3, x:x + 3] = 0.0                # dark: ignored by the model (right half)
    heatmaps = gradcam(model, images)
    left = heatmaps[:, :, :size // 2].sum(axis=(1, 2)) / heatmaps.sum(axis=(1, 2))
    assert np.all(left > 0.9), left
    assert np.all(gradcam(model, images, target_class=0) == 0)   # class 0 uses nothing: empty map


def test_feature_maps_lists_every_conv_and_pool_output():
    maps = feature_maps(tiny_model(), np.zeros((2, 1, 32, 32), np.float32))
    assert [name for name, _ in maps] == ["0 Conv2d", "2 MaxPool2d", "3 Conv2d", "5 MaxPool2d"]
    assert [a.shape for _, a in maps] == [(2, 4, 32, 32), (2, 4, 16, 16), (2, 8, 16, 16), (2, 8, 8, 8)]


# ------------------------------------------------------------------ lung mask
@pytest.mark.parametrize("label, seed", [(0, 1), (1, 2)])
def test_lung_mask_covers_the_dark_lungs_and_not_the_outside_air(label, seed):
    image = make_slice(label, np.random.default_rng(seed), 128)
    mask = lung_mask(image)
    assert mask.dtype == bool and mask.shape == image.shape
    assert 0.05 < mask.mean() < 0.5
    assert (image[mask] < 0.35).mean() > 0.5            # mostly dark pixels
    air, count = ndimage.label(image < 0.05)
    border = np.unique(np.concatenate([air[0], air[-1], air[:, 0], air[:, -1]]))
    outside = np.isin(air, border[border > 0])
    assert outside.sum() > 0.1 * image.size and not np.any(mask & outside)
    assert mass_inside(mask.astype(float), mask) == 1.0 and np.isnan(mass_inside(np.zeros_like(image), mask))


def test_mass_by_distance_puts_heat_in_bands_around_the_mask():
    """Bands: inside, (0, 1], (1, 3], (3, 6], (6, 12], > 12 pixels from a 10x10 square in a 40x40 image."""
    mask = np.zeros((40, 40), bool)
    mask[15:25, 15:25] = True
    even_heat, area = mass_by_distance(np.ones((40, 40)), mask)
    assert area.sum() == pytest.approx(1) and area[0] == pytest.approx(100 / 1600)
    assert even_heat == pytest.approx(area)                      # an even spread: each band its area's share
    ring = np.zeros((40, 40))
    ring[12, 15:25] = 1.0                                        # 3 rows above the square: band (1, 3]
    ring[0, 0] = 1.0                                             # the corner: > 12 px away
    heat, _ = mass_by_distance(ring, mask)
    assert heat == pytest.approx([0, 0, 10 / 11, 0, 0, 1 / 11])
    assert np.isnan(mass_by_distance(np.zeros((40, 40)), mask)[0]).all()


def test_lung_mask_of_a_blank_slice_is_empty():
    assert not lung_mask(np.zeros((32, 32), np.float32)).any()
    assert not lung_mask(np.ones((32, 32), np.float32)).any()


# ------------------------------------------------------------------ hand-made kernels
def test_hand_kernels_on_a_constant_image():
    conv = viz.hand_kernel_conv()
    assert isinstance(conv, mc.Conv2d) and conv.weight.shape == (2, 1, 3, 3)
    out = viz.apply_hand_kernels(np.full((12, 12), 0.4, np.float32))
    assert np.allclose(out["edge detection"][1:-1, 1:-1], 0, atol=1e-6)
    assert np.allclose(out["sharpen"][1:-1, 1:-1], 0.4, atol=1e-6)
    step = np.zeros((12, 12), np.float32)
    step[:, 6:] = 1.0
    edge = viz.apply_hand_kernels(step)["edge detection"]
    assert np.abs(edge[1:-1, 5:7]).min() > 2 and np.allclose(edge[1:-1, 1:4], 0)


# ------------------------------------------------------------------ figures
def test_every_figure_function_writes_a_png(tmp_path):
    model = tiny_model().eval()
    image = make_slice(1, np.random.default_rng(0), 32)
    images = np.stack([make_slice(k % 2, np.random.default_rng(k), 32) for k in range(5)])
    heatmaps = gradcam(model, images[:, None])
    paths = [
        viz.plot_filters(model, tmp_path / "filters.png"),
        viz.plot_feature_maps(model, image, tmp_path / "features.png", mean=0.4, std=0.3),
        viz.plot_hand_kernels(image, tmp_path / "kernels.png"),
        viz.plot_gradcam_grid(images, heatmaps, [1, 0, 1, 0, 1], [0.9, 0.2, 0.1, 0.7, 0.5],
                              tmp_path / "grid.png", threshold=0.5),
        viz.plot_gradcam_overlay(image, heatmaps[0], tmp_path / "one.png", title="x"),
    ]
    assert all(is_png(path) for path in paths)


def test_select_examples_mixes_correct_and_wrong():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    probs = np.array([0.9, 0.8, 0.2, 0.7, 0.1, 0.6, 0.3, 0.2])
    chosen = viz.select_examples(labels, probs, 0.5, n=4)
    correct = (probs[chosen] >= 0.5) == labels[chosen]
    assert len(set(chosen)) == 4 and correct.sum() == 2
    assert len(viz.select_examples(labels, probs, 0.5, n=20)) == 8


# ------------------------------------------------------------------ format swap
def test_reencode_swaps_the_format_and_keeps_the_gray_values(tmp_path):
    rng = np.random.default_rng(0)
    smooth_noise = ndimage.gaussian_filter(rng.standard_normal((40, 50, 3)), (3, 3, 0))
    rgba = np.full((40, 50, 4), 255, np.uint8)
    rgba[..., :3] = np.clip(128 + 400 * smooth_noise, 0, 255).astype(np.uint8)
    rgba[:5, :, 3] = 0                                  # transparent rows -> black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(rgba[..., 0]).save(tmp_path / "b.jpg", quality=95)
    as_jpeg = Image.open(io.BytesIO(viz.reencode(tmp_path / "a.png", "JPEG")))
    as_png = Image.open(io.BytesIO(viz.reencode(tmp_path / "b.jpg", "PNG")))
    assert as_jpeg.format == "JPEG" and as_png.format == "PNG"
    assert np.array_equal(to_gray(as_png), to_gray(Image.open(tmp_path / "b.jpg")))       # lossless
    original = to_gray(Image.open(tmp_path / "a.png"))
    assert original[:5].max() == 0 and to_gray(as_jpeg)[:4].mean() < 0.03
    assert np.abs(to_gray(as_jpeg) - original).mean() < 0.03          # JPEG noise, same picture


# ------------------------------------------------------------------ end to end
def test_shortcut_check_on_the_synthetic_dataset(run, tmp_path):
    data, checkpoint = run
    result = viz.shortcut_check(checkpoint, data, "val", tmp_path / "sc", cache_dir=tmp_path / "cache")
    saved = json.loads((tmp_path / "sc" / "shortcut.json").read_text())
    assert saved["n"] == result["n"] == 6
    cam, swap = saved["gradcam_in_lungs"], saved["format_swap"]
    for group in ("overall", "COVID", "non-COVID", "correct", "wrong"):
        assert {"n", "n_used", "mass_inside_lungs", "mass_outside_lungs", "lung_mask_area"} <= set(cam[group])
    assert cam["COVID"]["n"] + cam["non-COVID"]["n"] == 6
    assert swap["formats"]["COVID"] == {"before": {"PNG": 3}, "after": {"JPEG": 3}, "to": "JPEG"}
    assert swap["formats"]["non-COVID"] == {"before": {"PNG": 3}, "after": {"PNG": 3}, "to": "PNG"}
    for name in ("original", "reencoded"):
        assert {"accuracy", "auc", "sensitivity", "specificity"} <= set(swap[name])
    assert 0 <= swap["mean_abs_change_p_covid"] < 0.5
    assert set(swap["by_original_format"]) == {"COVID PNG", "non-COVID PNG"}
    assert "Shortcut check" in (tmp_path / "sc" / "shortcut.md").read_text()


def test_shortcut_check_says_where_the_heat_lies_around_the_lungs(tmp_path):
    """At 64 px the phantom's lung masks are found (at 32 px they are not): the heat by distance
    from the mask adds up, its first band is the mass inside, and the report shows the bands."""
    data = write_dataset(tmp_path / "data", n=24, size=96)
    train(TrainConfig(data=str(data), model="tiny", image_size=64, epochs=1, batch_size=8, progress=False,
                      out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), lungs="none"), log=lambda *_: None)
    cam = viz.shortcut_check(tmp_path / "run" / "best.npz", data, "val", tmp_path / "sc",
                             cache_dir=tmp_path / "cache")["gradcam_in_lungs"]
    assert cam["overall"]["n_used"] > 0
    bands = cam["by_distance"]
    assert bands["edges_px"] == [1, 3, 6, 12] and len(bands["heat"]) == len(bands["area"]) == 6
    assert sum(bands["area"]) == pytest.approx(1) and sum(bands["heat"]) == pytest.approx(1)
    assert bands["heat"][0] == pytest.approx(cam["overall"]["mass_inside_lungs"])
    assert bands["area"][0] == pytest.approx(cam["overall"]["lung_mask_area"])
    assert "| over 12 px outside |" in (tmp_path / "sc" / "shortcut.md").read_text()


def covidct(*args):
    env = dict(os.environ, MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "covidct", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_viz_kernels_and_predict_gradcam(run, tmp_path):
    data, checkpoint = run
    covid = sorted((data / "Images-processed" / "CT_COVID").glob("*.png"))[:2]
    result = covidct("viz", "kernels", "--image", covid[0], "--out", tmp_path / "k.png", "--size", 64)
    assert result.returncode == 0, result.stderr
    assert is_png(tmp_path / "k.png")
    result = covidct("predict", "--checkpoint", checkpoint, *covid, "--gradcam", tmp_path / "cams")
    assert result.returncode == 0, result.stderr
    assert "wrote 2 Grad-CAM overlays" in result.stdout
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == sorted(f"{p.stem}_gradcam.png" for p in covid)
    assert all(is_png(p) for p in (tmp_path / "cams").iterdir())


def test_cli_viz_actions_in_process(run, tmp_path, capsys):
    data, checkpoint = run
    image = sorted((data / "Images-processed" / "CT_NonCOVID").glob("*.png"))[0]
    assert main(["viz", "filters", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "f.png")]) == 0
    assert main(["viz", "features", "--checkpoint", str(checkpoint), "--image", str(image),
                 "--out", str(tmp_path / "m.png")]) == 0
    assert main(["viz", "gradcam", "--checkpoint", str(checkpoint), "--data", str(data), "--split", "val",
                 "--n", "4", "--out", str(tmp_path / "g.png"), "--cache-dir", str(tmp_path / "c")]) == 0
    assert all(is_png(tmp_path / name) for name in ("f.png", "m.png", "g.png"))
    assert main(["viz", "filters", "--checkpoint", str(tmp_path / "missing.npz"), "--out", "x.png"]) == 2
    assert "error:" in capsys.readouterr().err


def test_gradcam_on_resnet18_uses_layer4_and_leaves_no_gradients():
    from covidct.gradcam import default_layer_index, gradcam
    from minicnn.models import resnet18

    model = resnet18(num_classes=2, in_channels=1, rng=np.random.default_rng(0))
    assert default_layer_index(model) == 7  # conv1, bn1, relu, maxpool, layer1..layer4
    x = np.random.default_rng(1).standard_normal((2, 1, 64, 64)).astype(np.float32)
    heatmaps = gradcam(model, x)
    assert heatmaps.shape == (2, 64, 64) and heatmaps.min() >= 0 and heatmaps.max() <= 1
    assert heatmaps.max() > 0
    assert all(p.grad is None for p in model.parameters())
