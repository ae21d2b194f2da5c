"""Untagged images through the model: ``batch["known"]`` keeps MLC off them, the other tasks still train on them."""

import pytest
import torch

import hvpmtl
from conftest import make_batch, tiny_config

MLC_ONLY = ("tasks.swav.weight=0", "tasks.mim.weight=0", "tasks.distill.weight=0", "tasks.mlc.dropout=0")


def _view_grads(model, batch) -> tuple[dict, torch.Tensor]:
    """The outputs and the gradient of ``loss`` w.r.t. the clean view (what MLC reads), per image."""
    views = [v.clone().requires_grad_(True) for v in batch["views"]]
    out = model({**batch, "views": views})
    out["loss"].backward()
    return out, views[model.routing.masked_view ^ 1].grad.flatten(1).abs().sum(1)


@pytest.mark.parametrize("reduction", ("query2label", "per_image", "global_sum"))
def test_untagged_images_get_no_mlc_gradient(reduction):
    cfg = tiny_config(*MLC_ONLY, f"tasks.mlc.reduction={reduction}")
    model = hvpmtl.build(cfg).eval()
    batch = make_batch(cfg, batch_size=4)
    tagged = torch.tensor([True, False, True, False])
    _, unknown = _view_grads(model, {**batch, "known": tagged[:, None]})
    assert (unknown[~tagged] == 0).all() and (unknown[tagged] > 0).all()
    model.zero_grad()
    _, negative = _view_grads(model, batch)  # no mask: all-zero targets train as negatives
    assert (negative > 0).all()


def test_the_loss_is_the_loss_of_the_tagged_images_alone():
    cfg = tiny_config(*MLC_ONLY)
    model = hvpmtl.build(cfg).eval()
    batch = make_batch(cfg, batch_size=4)
    tagged = torch.tensor([True, False, True, True])
    with torch.no_grad():
        masked = model({**batch, "known": tagged[:, None]})["loss_mlc"]
        alone = model({k: ([x[tagged] for x in v] if k == "views" else v[tagged]) for k, v in batch.items()})
    torch.testing.assert_close(masked, alone["loss_mlc"])


def test_other_tasks_still_train_on_untagged_images():
    cfg = tiny_config("tasks.mlc.dropout=0")  # all four tasks
    model = hvpmtl.build(cfg).eval()
    batch = make_batch(cfg, batch_size=4)
    out, grads = _view_grads(model, {**batch, "known": torch.zeros(4, 1, dtype=torch.bool)})  # nothing tagged
    assert out["loss_mlc"].item() == 0.0 and torch.isfinite(out["loss"])
    assert (grads > 0).all()  # SwAV and momentum distillation read the clean view and need no tags
    assert out["loss_swav"] > 0 and out["loss_mim"] > 0  # (MD is 0 at the start: teacher = student)
