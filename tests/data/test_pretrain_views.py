"""Two views + mask per sample: shapes, determinism by (seed, epoch, index), collate, forward."""

from __future__ import annotations

import math

import pytest
import torch

import hvpmtl
from hvpmtl.data import (
    DataConfig,
    EvalImages,
    PretrainViews,
    SyntheticScenes,
    build_dataset,
    build_eval_transform,
    build_pretrain_dataset,
    build_view_transform,
    collate_pretrain,
)


@pytest.fixture(scope="module")
def cfg() -> hvpmtl.Config:
    return hvpmtl.load_config("cpu-tiny", ["data.train_size=32", "data.val_size=8"])


@pytest.fixture(scope="module")
def views(cfg: hvpmtl.Config) -> PretrainViews:
    return build_pretrain_dataset(cfg)


def test_shapes_and_dtypes(views: PretrainViews, cfg: hvpmtl.Config):
    s = views[0]
    v0, v1 = s["views"]
    S, g = cfg.backbone.img_size, cfg.backbone.img_size // cfg.tasks.mim.mask_patch_size
    assert v0.shape == v1.shape == (3, S, S) and v0.dtype == torch.float32
    assert type(v0) is torch.Tensor  # plain tensors, not tv_tensors
    assert s["mask"].shape == (g, g) and s["mask"].dtype == torch.bool
    assert s["labels"].shape == (10,) and s["labels"].dtype == torch.float32
    assert s["index"] == 0
    assert not torch.equal(v0, v1)
    assert -3 < v0.mean() < 3  # normalised


def test_mask_has_the_exact_count(views: PretrainViews, cfg: hvpmtl.Config):
    units = (cfg.backbone.img_size // cfg.tasks.mim.mask_patch_size) ** 2
    for i in range(8):
        assert int(views[i]["mask"].sum()) == math.ceil(cfg.tasks.mim.mask_ratio * units)


def test_deterministic_by_index_and_epoch(views: PretrainViews, cfg: hvpmtl.Config):
    a, b = views[(3, 2)], views[(3, 2)]
    assert all(torch.equal(x, y) for x, y in zip(a["views"], b["views"]))
    assert torch.equal(a["mask"], b["mask"])
    assert torch.equal(views[3]["views"][0], views[(3, 0)]["views"][0])
    c = views[(3, 5)]
    assert not torch.equal(a["views"][0], c["views"][0])
    # a freshly built data set (another process, a resumed run) gives the same views
    fresh = build_pretrain_dataset(cfg)
    assert torch.equal(fresh[(3, 2)]["views"][1], a["views"][1])
    other_seed = PretrainViews(views.base, views.transform, seed=views.seed + 1)
    assert not torch.equal(other_seed[(3, 2)]["views"][0], a["views"][0])


def test_global_rng_untouched(views: PretrainViews):
    state = torch.get_rng_state()
    views[(1, 1)]
    assert torch.equal(torch.get_rng_state(), state)


def test_augmentations_are_configurable(cfg: hvpmtl.Config):
    plain = hvpmtl.load_config(
        "cpu-tiny",
        [
            "data.crop_scale=[1.0, 1.0]",
            "data.crop_ratio=[1.0, 1.0]",
            "data.hflip=0.0",
            "data.color_jitter=0.0",
            "data.rotation=0.0",
            "data.rand_augment=false",
            "data.mean=[0.0, 0.0, 0.0]",
            "data.std=[1.0, 1.0, 1.0]",
        ],
    )
    t = build_view_transform(plain)
    image = SyntheticScenes(4, 64)[0]["image"]
    v0, v1, _ = t(image)
    assert torch.allclose(v0, image.float() / 255) and torch.equal(v0, v1)


def test_collate_feeds_the_model(views: PretrainViews, cfg: hvpmtl.Config):
    batch = collate_pretrain([views[(i, 1)] for i in range(4)])
    S = cfg.backbone.img_size
    assert [v.shape for v in batch["views"]] == [(4, 3, S, S)] * 2
    assert batch["mask"].shape == (4, 4, 4) and batch["mask"].dtype == torch.bool
    assert batch["labels"].shape == (4, 10) and batch["index"].tolist() == [0, 1, 2, 3]
    torch.manual_seed(0)
    model = hvpmtl.build(cfg, num_classes=len(views.classes))
    out = model(batch)
    assert torch.isfinite(out["loss"])
    assert {"loss_mlc", "loss_swav", "loss_mim", "loss_distill"} <= set(out)


def test_dataloader_with_epoch_keys(views: PretrainViews):
    loader = torch.utils.data.DataLoader(
        views, batch_size=4, sampler=[(i, 7) for i in range(8)], collate_fn=collate_pretrain
    )
    first = next(iter(loader))
    assert torch.equal(first["views"][0][2], views[(2, 7)]["views"][0])
    # a worker process (its own RNG, one thread) yields the same batch
    workers = torch.utils.data.DataLoader(
        views, batch_size=4, sampler=[(i, 7) for i in range(8)], collate_fn=collate_pretrain, num_workers=1
    )
    in_worker = next(iter(workers))
    assert all(torch.equal(a, b) for a, b in zip(in_worker["views"], first["views"]))
    assert torch.equal(in_worker["mask"], first["mask"])


def test_config_round_trip(cfg: hvpmtl.Config, tmp_path):
    hvpmtl.save_config(cfg, tmp_path / "c.yaml")
    again = hvpmtl.load_config(str(tmp_path / "c.yaml"))
    assert again.data == cfg.data


def test_eval_images(cfg: hvpmtl.Config):
    base = build_dataset(cfg.data, cfg.backbone.img_size, "val")
    ds = EvalImages(base, build_eval_transform(cfg))
    image, labels = ds[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and labels.shape == (10,)
    assert torch.equal(ds[0][0], image)  # no randomness
    assert ds.classes == base.classes


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"data\.label_noise=1\.0"):
        hvpmtl.load_config(None, ["data.label_noise=1.0"])
    with pytest.raises(ValueError, match=r"data\.dataset='foo': unknown \(choose from synthetic"):
        hvpmtl.load_config(None, ["data.dataset=foo"])
    with pytest.raises(ValueError, match=r"data\.crop_scale"):
        hvpmtl.load_config(None, ["data.crop_scale=[0.5, 0.2]"])
    with pytest.raises(ValueError, match=r"data\.on_bad_image"):
        hvpmtl.load_config(None, ["data.on_bad_image=ignore"])
    with pytest.raises(ValueError, match=r"data\.dataset: unknown 'foo'"):
        build_dataset(DataConfig(dataset="foo"), 64)


def test_rand_augment_magnitude_is_on_timms_scale():
    from hvpmtl.data.views import RandAugment

    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    fixed = RandAugment(2, magnitude=9.0, magnitude_std=0.0)
    fixed(image)
    rotate = RandAugment._AUGMENTATION_SPACE["Rotate"][0](fixed.num_magnitude_bins, 16, 16)
    assert rotate[fixed.magnitude].item() == pytest.approx(27.0)  # 90 % of 30 degrees, as timm's m9
    noisy = RandAugment(2, magnitude=9.0, magnitude_std=0.5)
    torch.manual_seed(0)
    levels = []
    for _ in range(400):
        noisy(image)
        levels.append(noisy.magnitude / 10)
    levels = torch.tensor(levels)
    assert levels.max() <= 10.0 and 8.85 < levels.mean() < 9.1 and 0.35 < levels.std() < 0.55  # clipped at 10
