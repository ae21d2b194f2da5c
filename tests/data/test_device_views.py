"""Views made on the device (data/device_views.py, data/device_ops.py): each batched op against
torchvision's per-image kernel, the whole view against the CPU path, determinism by
(seed, epoch, index), and pre-training runs with data.augment_on=device.

Tolerance: one uint8 level on at most 0.1 % of the pixels, per op and for a whole view (on the
CPU the batched ops round exactly as the per-image kernels do, so both are usually equal)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

import hvpmtl
from hvpmtl.cli import main
from hvpmtl.config import ConfigError
from hvpmtl.data import DeviceViews, TwoViewCrops, build_pretrain_dataset, collate_pretrain
from hvpmtl.data import device_ops as ops
from hvpmtl.data.config import IMAGENET_STD
from hvpmtl.data.views import RandAugment
from hvpmtl.engine.checkpoint import list_checkpoints
from hvpmtl.engine.metrics import read_metrics

B, H, W = 6, 20, 28  # not square: a swapped height and width would show


def assert_close_uint8(batched: torch.Tensor, single: torch.Tensor) -> None:
    """At most one level apart, and on at most 0.1 % of the values."""
    assert batched.dtype == single.dtype == torch.uint8 and batched.shape == single.shape
    diff = (batched.int() - single.int()).abs()
    assert diff.max() <= 1, diff.max()
    assert (diff > 0).float().mean() <= 1e-3, (diff > 0).float().mean()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (B // 2, 3, H, W), dtype=torch.uint8, generator=g)
    coarse = torch.randint(0, 256, (B // 2, 3, 5, 7), generator=g).float()
    smooth = torch.nn.functional.interpolate(coarse, size=(H, W), mode="bilinear").round().to(torch.uint8)
    return torch.cat([noise, smooth])  # smooth images have flat regions, where rounding ties happen


def uniform(lo: float, hi: float, seed: int = 1) -> torch.Tensor:
    return torch.empty(B, dtype=torch.float64).uniform_(lo, hi, generator=torch.Generator().manual_seed(seed))


JITTER = {  # batched op, torchvision kernel, parameter range (ColorJitter(0.4): factors 0.6-1.4, hue +-0.1)
    "brightness": (ops.brightness, F.adjust_brightness, (0.6, 1.4)),
    "contrast": (ops.contrast, F.adjust_contrast, (0.6, 1.4)),
    "saturation": (ops.saturation, F.adjust_saturation, (0.6, 1.4)),
    "hue": (ops.hue, F.adjust_hue, (-0.1, 0.1)),
    "sharpness": (ops.sharpness, F.adjust_sharpness, (0.1, 1.9)),
}


@pytest.mark.parametrize("name", list(JITTER))
def test_colour_op_matches_the_per_image_kernel(images, name):
    batched, kernel, (lo, hi) = JITTER[name]
    factors = uniform(lo, hi)
    expected = torch.stack([kernel(images[i], float(factors[i])) for i in range(B)])
    assert_close_uint8(batched(images, factors), expected)


def test_rotation_matches_random_rotation(images):
    angles = uniform(-10.0, 10.0)  # bilinear, fill 0 (RandomRotation's default), as the views use it
    expected = torch.stack([F.rotate(images[i], float(angles[i]), v2.InterpolationMode.BILINEAR, fill=0)
                            for i in range(B)])  # fmt: skip
    out = ops.rotate(images, angles, mode="bilinear", fill_zero=True)
    assert_close_uint8(out, expected)
    assert not torch.equal(out, images)


def test_flip_posterize_solarize_hand_values():
    x = torch.tensor([[[[0, 100, 200, 255]]] * 3], dtype=torch.uint8).view(1, 3, 1, 4).repeat(2, 1, 1, 1)
    assert ops.hflip(x)[0, 0, 0].tolist() == [255, 200, 100, 0]
    # 4 bits keep 0xF0, 1 bit keeps 0x80
    assert ops.posterize(x, torch.tensor([4.0, 1.0]))[:, 0, 0].tolist() == [[0, 96, 192, 240], [0, 0, 128, 128]]
    # values >= 128 inverted in image 0, >= 255 in image 1
    assert ops.solarize(x, torch.tensor([128.0, 255.0]))[:, 0, 0].tolist() == [[0, 100, 55, 0], [0, 100, 200, 0]]


def test_the_batched_table_is_torchvisions():
    assert set(v2.RandAugment._AUGMENTATION_SPACE) == set(ops.RAND_AUGMENT_OPS)


@pytest.mark.parametrize("name", ops.RAND_AUGMENT_OPS)
def test_rand_augment_op_matches_torchvision(images, name):
    ra = RandAugment()
    magnitudes_fn, signed = ra._AUGMENTATION_SPACE[name]
    table = magnitudes_fn(ra.num_magnitude_bins, H, W)
    if table is None:
        values = torch.zeros(B, dtype=torch.float64)
    else:  # the smallest and largest magnitudes, and four between; both signs where the op has them
        bins = [0, ra.LEVELS, 13, 47, 71, 90]
        values = torch.tensor([float(table[b]) * (-1 if signed and i % 2 else 1) for i, b in enumerate(bins)],
                              dtype=torch.float64)  # fmt: skip
    expected = torch.stack([
        ra._apply_image_or_video_transform(images[i], name, float(values[i]), interpolation=ra.interpolation,
                                           fill=ra._fill)
        for i in range(B)
    ])  # fmt: skip
    assert_close_uint8(ops.rand_augment_op(name, images, values), expected)


# ------------------------------------------------------------------------------------------------
# SimMIM's m9 +- 0.5 (cpu-tiny's own m3 has no noise): the per-view magnitude draw is compared too
TINY_DATA = ["data.train_size=24", "data.val_size=8", "backbone.img_size=32", "backbone.patch_size=8",
             "tasks.mim.mask_patch_size=16", "data.rand_augment_magnitude=9",
             "data.rand_augment_magnitude_std=0.5"]  # fmt: skip


@pytest.fixture(scope="module")
def both_paths() -> tuple:
    cpu = build_pretrain_dataset(hvpmtl.load_config("cpu-tiny", TINY_DATA))
    device = build_pretrain_dataset(hvpmtl.load_config("cpu-tiny", [*TINY_DATA, "data.augment_on=device"]))
    return cpu, device


def test_device_views_match_the_cpu_path(both_paths):
    cpu, device = both_paths
    assert isinstance(device.transform, TwoViewCrops) and not isinstance(cpu.transform, TwoViewCrops)
    keys = [(i, 2) for i in range(8)]
    expected = collate_pretrain([cpu[k] for k in keys])
    recipes = collate_pretrain([device[k] for k in keys])
    assert recipes["views"][0]["crop"].dtype == torch.uint8 and recipes["views"][0]["crop"].shape == (8, 3, 32, 32)
    out = DeviceViews(device.transform)(recipes, "cpu")
    for k in ("mask", "labels", "index"):  # drawn after the views: the same draws came before
        assert torch.equal(out[k], expected[k]), k
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for got, want in zip(out["views"], expected["views"]):
        assert got.dtype == torch.float32 and got.shape == want.shape
        levels = ((got - want) * std * 255).abs()  # back on the 0-255 scale
        assert levels.max() <= 1.0 + 1e-3 and (levels > 1e-3).float().mean() <= 1e-3


def test_rand_augment_op_prob_on_both_paths():
    # timm's per-op probability: a skipped op is drawn where the CPU path draws it and kept as Identity
    half = [*TINY_DATA, "data.rand_augment_op_prob=0.5"]
    cpu = build_pretrain_dataset(hvpmtl.load_config("cpu-tiny", half))
    device = build_pretrain_dataset(hvpmtl.load_config("cpu-tiny", [*half, "data.augment_on=device"]))
    keys = [(i, 3) for i in range(16)]
    expected = collate_pretrain([cpu[k] for k in keys])
    recipes = collate_pretrain([device[k] for k in keys])
    identity = ops.RAND_AUGMENT_OPS.index("Identity")
    skipped = (recipes["views"][0]["ra_ops"] == identity).float().mean()
    assert 0.3 < skipped < 0.8  # about half the ops (plus Identity's own 1/14)
    out = DeviceViews(device.transform)(recipes, "cpu")
    assert torch.equal(out["mask"], expected["mask"])
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for got, want in zip(out["views"], expected["views"]):
        levels = ((got - want) * std * 255).abs()
        assert levels.max() <= 1.0 + 1e-3 and (levels > 1e-3).float().mean() <= 1e-3


def test_recipes_hold_every_step(both_paths):
    _, device = both_paths
    r0, r1, mask = device.transform(device.base[0]["image"])
    assert set(r0) == {"crop", "flip", "angle", "jitter", "jitter_order", "jitter_factors", "ra_ops", "ra_magnitudes"}
    assert r0["ra_ops"].shape == r0["ra_magnitudes"].shape == (2,)
    assert sorted(r0["jitter_order"].tolist()) == [0, 1, 2, 3]
    assert -10.0 <= float(r0["angle"]) <= 10.0 and not torch.equal(r0["crop"], r1["crop"])


def test_same_sample_same_views_whatever_the_batch(both_paths):
    _, device = both_paths
    finish = DeviceViews(device.transform)
    a = finish(collate_pretrain([device[(i, 1)] for i in range(8)]), "cpu")
    order = [5, 11, 2, 0, 9]  # another composition, another order, another size
    b = finish(collate_pretrain([device[(i, 1)] for i in order]), "cpu")
    for row, i in enumerate(order):
        if i < 8:
            assert all(torch.equal(x[row], y[i]) for x, y in zip(b["views"], a["views"])), i
    c = finish(collate_pretrain([device[(i, 2)] for i in range(8)]), "cpu")  # another epoch
    assert not torch.equal(c["views"][0][0], a["views"][0][0])


def test_steps_that_are_off_leave_the_crop():
    plain = TwoViewCrops(32, 16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, color_jitter=0.0,
                         rotation=0.0, rand_augment=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # fmt: skip
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    r0, r1, mask = plain(image)
    batch = collate_pretrain([{"views": (r0, r1), "mask": mask, "labels": torch.zeros(2), "index": 0}])
    out = DeviceViews(plain)(batch)
    for view in out["views"]:
        torch.testing.assert_close(view[0], image.float() / 255, atol=1e-6, rtol=0)
    with pytest.raises(TypeError, match="needs recipes"):
        DeviceViews(plain)(out)


def test_augment_on_is_checked():
    with pytest.raises(ConfigError, match="data.augment_on='gpu'"):
        hvpmtl.load_config("cpu-tiny", ["data.augment_on=gpu"])


# ------------------------------------------------------------------------------------------------
RUN = [
    *TINY_DATA, "data.train_size=64", "data.batch_size=16", "data.num_workers=1",
    "backbone.kwargs={depth: 2, embed_dim: 64, num_heads: 2}", "tasks.mlc.dim=32", "tasks.mlc.num_heads=2",
    "tasks.mlc.ffn_dim=64", "tasks.swav.hidden_dim=64", "tasks.swav.out_dim=32", "tasks.swav.num_prototypes=16",
    "tasks.swav.freeze_prototypes_iters=3", "optim.lr=1e-3", "optim.warmup_steps=3", "eval.knn_every=0",
    "train.progress=false", "train.log_every=1",
]  # fmt: skip


def pretrain(capsys, *args: str) -> int:
    rc = main(["pretrain", *args])
    capsys.readouterr()
    return rc


@pytest.mark.slow
def test_pretrain_on_device_views_equals_cpu_views(tmp_path, capsys):
    for where in ("cpu", "device"):
        out = tmp_path / where
        assert pretrain(capsys, *RUN, "train.max_steps=2", f"data.augment_on={where}", f"train.output_dir={out}") == 0
    ra, rb = read_metrics(tmp_path / "cpu" / "metrics.csv"), read_metrics(tmp_path / "device" / "metrics.csv")
    assert [r["step"] for r in rb] == [1, 2]
    for x, y in zip(ra, rb):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4) and torch.isfinite(torch.tensor(y["loss"]))


@pytest.mark.slow
def test_killed_run_on_device_views_resumes_exactly(tmp_path, capsys):
    common = [*RUN, "data.augment_on=device", "train.max_steps=6", "train.ckpt_every=2"]  # 4 steps per epoch
    a, b = tmp_path / "a", tmp_path / "b"
    assert pretrain(capsys, *common, f"train.output_dir={a}") == 0
    from hvpmtl.engine.faults import inject

    with inject(stop_after=5):
        assert pretrain(capsys, *common, f"train.output_dir={b}") == 1
    assert [s for s, _ in list_checkpoints(b)][-1] == 4
    assert pretrain(capsys, *common, f"train.output_dir={b}", "train.resume=auto") == 0
    ra, rb = read_metrics(a / "metrics.csv"), read_metrics(b / "metrics.csv")
    assert [r["step"] for r in rb] == [r["step"] for r in ra] == list(range(1, 7))
    for x, y in zip(ra, rb):
        for k in x:
            if k != "img_per_s":
                assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), (x["step"], k)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0, msg=k)
