"""Can the noise report's ranking be trusted? The tagger's own mAP on held-out images, against chance
(and the scoring of a data set with the MLC head that both use).

The noise report ranks (image, tag) pairs by how strongly the run's MLC head contradicts them. That
ranking means something only when the head tags well: a head near chance flags pairs at random.
So the report scores the head on held-out images (the data's val split; the report's own images
when they are the val or test split) and compares its mAP with chance, the mAP of a random
ranking: the mean share of positive images of the classes scored. The ranking is called
untrustworthy when the head's mAP covers less than a fifth of the way from chance to a perfect
100: below ``chance + 0.2 * (100 - chance)``, e.g. 21.8 at a chance of 2.2 (a 134-tag collection
whose head scored 6.6 flagged 18,934 pairs), 60 at a chance of 50. (Twice chance, the first rule
tried, cannot be reached when chance is 50 or more.)
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

TRUST_FRACTION = 0.2  # the part of the way from chance to 100 mAP a head must cover


def trust_threshold(chance: float) -> float:
    """The held-out mAP (%) a head needs for its ranking to be trusted."""
    return chance + TRUST_FRACTION * (100.0 - chance)


def ranking_trusted(map_percent: float, chance_percent: float) -> bool:
    """Whether a head with this held-out mAP (%) ranks better than noise (module docstring)."""
    return map_percent >= trust_threshold(chance_percent)


def chance_map(labels: torch.Tensor) -> float:
    """The mAP (%) of a random ranking of ``N x C`` multi-hot ``labels``: the mean share of positives
    over the classes that have one (those the macro mAP averages)."""
    share = labels.float().mean(dim=0)
    kept = labels.sum(dim=0) > 0
    return 100.0 * float(share[kept].mean()) if kept.any() else 0.0


def head_check(probs: torch.Tensor, labels: torch.Tensor, split: str) -> dict:
    """``{"split", "images", "mAP", "chance", "threshold", "trusted"}`` of a head's probabilities
    on held-out images."""
    from hvpmtl.eval.metrics import mean_average_precision

    chance = chance_map(labels)
    score = mean_average_precision(probs, labels)
    return {"split": split, "images": int(labels.shape[0]), "mAP": score, "chance": chance,
            "threshold": trust_threshold(chance), "trusted": ranking_trusted(score, chance)}  # fmt: skip


def describe(check: dict | None, why_not: str = "") -> tuple[str, str | None]:
    """The report's line on the head, and a warning line when its ranking cannot be trusted."""
    if check is None:
        line = f"held-out mAP of the head: unknown ({why_not})"
        return line, f"warning: {line}: whether this ranking can be trusted was not checked"
    line = (f"held-out mAP of the head: {check['mAP']:.1f} on {check['images']} {check['split']} images, chance "
            f"{check['chance']:.1f} (a ranking is trusted from {check['threshold']:.1f}: "
            f"{TRUST_FRACTION:.0%} of the way from chance to 100)")  # fmt: skip
    if check["trusted"]:
        return line, None
    return line, (f"warning: this ranking cannot be trusted: the head scores {check['mAP']:.1f} mAP on held-out "
                  f"images, chance is {check['chance']:.1f}; its flags are close to random")  # fmt: skip


class TaggedImages(Dataset):
    """``(eval image, given tags, clean tags, index)``; clean tags are the given ones when the
    data set knows no others."""

    def __init__(self, base: Dataset, transform, count: int):
        self.base, self.transform, self.count = base, transform, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        s = self.base[i]
        labels = s["labels"].float()
        clean = s["clean_labels"].float() if "clean_labels" in s else labels
        return self.transform(s["image"]), labels, clean, int(s.get("index", i))


@torch.no_grad()
def head_probabilities(backbone, head, loader: DataLoader, device: torch.device, bf16: bool = False,
                       order: list[int] | None = None):  # fmt: skip
    """MLC probabilities ``N x C`` with the given and clean tags and the image indices read;
    ``order``: the logit of each data tag when the data lists the run's tags in another order."""
    probs, given, clean, index = [], [], [], []
    for x, y, yc, i in loader:
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            logits = head(backbone(x.to(device), None)[0])[0]
        logits = logits if order is None else logits[:, order]
        probs.append(logits.float().sigmoid().cpu())
        given.append(y)
        clean.append(yc)
        index.append(i)
    return torch.cat(probs), torch.cat(given), torch.cat(clean), torch.cat(index)
