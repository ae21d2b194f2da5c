"""Typed configs: presets, overrides, and errors that name the key."""

import pytest

import hvpmtl
from hvpmtl.config import ConfigError, load_config, parse_override, preset_names, save_config, to_dict


def test_defaults_are_the_papers_values():
    cfg = load_config()
    t = cfg.tasks
    assert (t.mlc.weight, t.swav.weight, t.mim.weight, t.distill.weight) == (0.001, 0.02, 1.0, 10.0)
    assert (t.mlc.eta, *t.mlc.gammas) == (10.0, 4.0, 1.0)
    assert t.swav.t_max == 10.0 and t.swav.epsilon == 0.05 and t.swav.sinkhorn_iters == 3
    assert t.distill.momentum == 0.995 and t.mim.mask_patch_size == 32 and t.mim.mask_ratio == 0.6
    assert cfg.optim.weight_decay == 0.05 and cfg.optim.lr == 1e-4 and cfg.optim.min_lr == 1e-7


@pytest.mark.parametrize("name", preset_names())
def test_mlc_reduction_of_each_preset(name):
    # every preset: Query2Label's reduction; the paper and GPU presets at the paper's alpha_1
    mlc = load_config(name).tasks.mlc
    assert mlc.reduction == "query2label"
    if not name.startswith("cpu-"):
        assert mlc.weight == 0.001


# the CPU presets' alpha_1 under Query2Label's reduction gives the very loss their results were
# measured with: ASL's per_image sum (x16) at alpha_1 0.01, over the preset's tags
CPU_PRESET_TAGS = [("cpu-tiny", 10), ("cpu-micro", 10), ("cpu-swin-tiny", 10), ("cpu-emoji", 130)]


@pytest.mark.parametrize("name,num_tags", CPU_PRESET_TAGS)
def test_cpu_presets_keep_the_measured_mlc_weight(name, num_tags):
    import torch

    from hvpmtl.objectives.mlc import weighted_asymmetric_loss
    mlc = load_config(name).tasks.mlc
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(8, num_tags, generator=g), (torch.rand(8, num_tags, generator=g) < 0.2).float()
    ours = mlc.weight * weighted_asymmetric_loss(logits, targets, reduction=mlc.reduction)
    measured = 0.01 * 16.0 * weighted_asymmetric_loss(logits, targets, reduction="per_image")
    assert ours.item() == pytest.approx(measured.item(), rel=1e-6)


# (magnitude, std) each CPU preset's results were measured with: cpu-tiny's and cpu-swin-tiny's m3 won
# at their own budgets (docs/results.md); cpu-micro's m3 did not win on every measure at its 200 steps
# (docs/method.md), so it keeps SimMIM's m9 +- 0.5, as does cpu-emoji until measured there
CPU_PRESET_RAND_AUGMENT = [("cpu-tiny", 3.0, 0.0), ("cpu-emoji", 9.0, 0.5), ("cpu-micro", 9.0, 0.5),
                           ("cpu-swin-tiny", 3.0, 0.0)]


@pytest.mark.parametrize("name,magnitude,std", CPU_PRESET_RAND_AUGMENT)
def test_cpu_presets_keep_the_measured_rand_augment(name, magnitude, std):
    data = load_config(name).data
    assert (data.rand_augment_magnitude, data.rand_augment_magnitude_std) == (magnitude, std)
    assert data.rand_augment and data.rand_augment_ops == 2 and data.rand_augment_op_prob == 1.0


def test_presets_load_and_override():
    for name in preset_names():
        load_config(name)
    cfg = load_config("cpu-tiny", ["optim.lr=2e-4", "tasks.mim.weight=0", "backbone.kwargs.depth=1"])
    assert cfg.optim.lr == 2e-4 and cfg.tasks.mim.weight == 0.0
    # mappings merge key by key: the preset's other timm arguments stay
    preset = load_config("cpu-tiny").backbone.kwargs
    assert cfg.backbone.kwargs == {**preset, "depth": 1}
    assert cfg.backbone.img_size == 64  # from the preset


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "optim.lrr"),
    ("tasks.mlc.eta=many", "tasks.mlc.eta"),
    ("tasks.swav.num_prototypes=1.5", "tasks.swav.num_prototypes"),
    ("tasks.swav.stabilize=log", "tasks.swav.stabilize"),
    ("tasks.mlc.focusing=other", "tasks.mlc.focusing"),
    ("backbone.name=not_a_model", "backbone.name"),
    ("data.prefetch_factor=0", "data.prefetch_factor"),
    ("tasks.swav.queue_length=-1", "tasks.swav.queue_length"),
    ("bogus=1", "bogus"),
    ("novalue", "key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        load_config("cpu-tiny", [override])


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="cpu-tiny"):
        load_config("no-such-preset")


def test_yaml_file_round_trip(tmp_path):
    cfg = load_config("cpu-tiny", ["tasks.swav.t_max=5"])
    path = tmp_path / "run.yaml"
    save_config(cfg, path)
    assert to_dict(load_config(str(path))) == to_dict(cfg)


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=1e-3") == {"a": {"b": 1e-3}}
    assert parse_override("a=[1, 2]") == {"a": [1, 2]}
    assert parse_override("a=null") == {"a": None}


def test_build_from_preset():
    model = hvpmtl.build(load_config("cpu-tiny"), num_classes=3)
    assert model.mlc.label_embed.num_embeddings == 3
