"""Every supported timm family and size: forward, backward, gradients, mask-token placement."""

import pytest
import torch

from hvpmtl.backbones import BackboneConfig, MaskedSwin, MaskedViT, build_backbone
from hvpmtl.data.masking import MaskGenerator

# The paper's backbones and their smaller siblings, at small image sizes for CPU.
SUPPORTED = [
    BackboneConfig("vit_tiny_patch16_224", img_size=32),
    BackboneConfig("vit_small_patch16_224", img_size=32),
    BackboneConfig("vit_base_patch16_224", img_size=32),
    BackboneConfig("vit_tiny_patch16_224", img_size=64, patch_size=8),
    BackboneConfig("vit_tiny_patch16_224", img_size=64, patch_size=8, stem_channels=[8, 16]),
    BackboneConfig("swin_tiny_patch4_window7_224", img_size=64, window_size=4),
    BackboneConfig("swin_small_patch4_window7_224", img_size=64, window_size=4),
    BackboneConfig("swin_base_patch4_window7_224", img_size=64, window_size=4),
]


@pytest.mark.parametrize("cfg", SUPPORTED, ids=lambda c: f"{c.name}@{c.img_size}{'-stem' if c.stem_channels else ''}")
def test_forward_backward_every_parameter_gets_gradient(cfg):
    torch.manual_seed(0)
    bb = build_backbone(cfg)
    s = cfg.img_size
    mask = MaskGenerator(s, 32 if s >= 64 else 16, 0.6)(2)
    fmap, pooled = bb(torch.randn(2, 3, s, s), mask)
    assert fmap.shape == (2, bb.num_features, s // bb.reduction, s // bb.reduction)
    assert pooled.shape == (2, bb.num_features)
    (fmap.square().mean() + pooled.square().mean()).backward()
    missing = [n for n, p in bb.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in bb.parameters())
    assert torch.isfinite(fmap).all()


def test_swin_reduction_is_last_stage_32():
    bb = build_backbone(BackboneConfig("swin_tiny_patch4_window7_224", img_size=64, window_size=4))
    assert isinstance(bb, MaskedSwin) and bb.reduction == 32 and bb.patch_size == 4


def _capture_vit_embeddings(bb: MaskedViT, x, mask):
    seen = {}
    original = bb.model._pos_embed

    def spy(tokens):
        seen["tokens"] = tokens.detach().clone()
        return original(tokens)

    bb.model._pos_embed = spy
    bb(x, mask)
    return seen["tokens"]


def test_vit_masked_tokens_equal_mask_token_before_position_embedding():
    bb = build_backbone(BackboneConfig("vit_tiny_patch16_224", img_size=64, patch_size=8)).eval()
    mask = MaskGenerator(64, 32, 0.6)(3)  # 2x2 units of 32 px -> 4x4 ViT patches each
    tokens = _capture_vit_embeddings(bb, torch.randn(3, 3, 64, 64), mask)  # B x 64 x D, no class token yet
    assert tokens.shape[1] == 64
    patch_mask = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).flatten(1)
    token = bb.mask_token.detach().view(-1)
    assert torch.allclose(tokens[patch_mask], token.expand(int(patch_mask.sum()), -1))
    assert not torch.isclose(tokens[~patch_mask], token).all(-1).any()
    assert patch_mask.float().mean().item() == pytest.approx(3 / 4)  # ceil(.6 * 4) = 3 of 4 units


def test_conv_stem_keeps_the_patch_grid_masks_after_it_and_sees_across_patch_borders():
    cfg = BackboneConfig("vit_tiny_patch16_224", img_size=32, patch_size=8, stem_channels=[4, 8])
    bb = build_backbone(cfg).eval()
    stem = bb.model.patch_embed
    assert bb.patch_size == 8 and tuple(stem.grid_size) == (4, 4)
    assert [m.conv.out_channels for m in stem.backbone] == [4, 8] and stem.proj.kernel_size == (8, 8)
    mask = MaskGenerator(32, 16, 0.5)(2)  # 16 px units: 2x2 patches each
    tokens = _capture_vit_embeddings(bb, torch.randn(2, 3, 32, 32), mask)
    patch_mask = mask.repeat_interleave(2, 1).repeat_interleave(2, 2).flatten(1)
    token = bb.mask_token.detach().view(-1)
    assert torch.allclose(tokens[patch_mask], token.expand(int(patch_mask.sum()), -1))
    assert not torch.isclose(tokens[~patch_mask], token).all(-1).any()

    # two 3x3 convs reach 2 pixels beyond a patch; a linear embedding would reach none
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        base = stem(x)
        changed = {}
        for name, (row, col) in {"inside": (4, 4), "edge": (7, 4), "two in": (6, 4), "three in": (5, 4)}.items():
            y = x.clone()
            y[0, :, row, col] += 1.0
            changed[name] = (stem(y) - base).abs().amax(-1)[0].view(4, 4).gt(1e-6).nonzero().tolist()
    assert changed["inside"] == [[0, 0]] and changed["three in"] == [[0, 0]]
    assert changed["edge"] == [[0, 0], [1, 0]] and changed["two in"] == [[0, 0], [1, 0]]
    bias = stem.proj.bias.detach().view(1, 1, -1)
    with torch.no_grad():  # the stem is not linear: doubling the input does not double the tokens
        assert not torch.allclose(stem(2 * x) - bias, 2 * (base - bias), atol=1e-3)


def test_swin_masked_tokens_equal_mask_token_after_patch_embedding():
    bb = build_backbone(BackboneConfig("swin_tiny_patch4_window7_224", img_size=64, window_size=4)).eval()
    seen = {}
    bb.model.layers.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].detach().clone()))
    mask = MaskGenerator(64, 32, 0.6)(2)
    bb(torch.randn(2, 3, 64, 64), mask)
    grid = seen["x"]  # B x 16 x 16 x C, 4x4-pixel patches
    patch_mask = mask.repeat_interleave(8, 1).repeat_interleave(8, 2)
    token = bb.mask_token.detach().view(-1)
    assert torch.allclose(grid[patch_mask], token.expand(int(patch_mask.sum()), -1))
    assert not torch.isclose(grid[~patch_mask], token).all(-1).any()


def test_no_mask_equals_all_false_mask():
    bb = build_backbone(BackboneConfig("vit_tiny_patch16_224", img_size=32)).eval()
    x = torch.randn(2, 3, 32, 32)
    a, _ = bb(x)
    b, _ = bb(x, torch.zeros(2, 1, 1, dtype=torch.bool))
    torch.testing.assert_close(a, b)


def test_unsupported_family_is_a_clear_error():
    with pytest.raises(ValueError, match="backbone.name"):
        build_backbone(BackboneConfig("resnet18", img_size=32))
