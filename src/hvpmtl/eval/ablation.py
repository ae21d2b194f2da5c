"""``hvpmtl ablate``: which objectives earn their place (the paper's Table 5, plus each alone).

One preset is pre-trained under every task mix on the same data, budget and seeds; each
backbone, and the random initialisation the runs started from, is then scored by the frozen-
feature evaluations of :mod:`hvpmtl.eval.frozen` (``hvpmtl linprobe`` / ``hvpmtl knn``), and a
table of mean ± std over seeds is written; next to the probe, the mAP of the pre-trained MLC
head itself (``hvpmtl mlc-head``) for the mixes that train one. Every cell is an ordinary run
folder ``<out>/<mix>-s<seed>`` and every step an ordinary ``hvpmtl`` command, so an interrupted
ablation continues where it stopped and any cell can be re-run by hand. The commands run through
the ``run_command`` the caller passes (``hvpmtl ablate``: the CLI's own ``main``) or a launcher.

Momentum distillation is not offered alone: it distils the MLC head's label similarities, and
without MLC (or a pre-trained head) it has no label signal to distil.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TASKS = ("mlc", "swav", "mim", "distill")
MIXES = {  # name -> the tasks switched off (weight 0, not built)
    "full": (),
    "no-mlc": ("mlc",),
    "no-swav": ("swav",),  # the paper's "w/o CL"
    "no-mim": ("mim",),
    "no-md": ("distill",),
    "mlc": ("swav", "mim", "distill"),
    "swav": ("mlc", "mim", "distill"),
    "mim": ("mlc", "swav", "distill"),
    "mlc-md": ("swav", "mim"),  # the supervised half; not in the default run (DEFAULT_MIXES)
}
DEFAULT_MIXES = ("full", "no-mlc", "no-swav", "no-mim", "no-md", "mlc", "swav", "mim")  # Table 5 + each alone
LABELS = {
    "full": "all four (HVP-MTL)", "no-mlc": "without MLC", "no-swav": "without SwAV (CL)",
    "no-mim": "without MIM", "no-md": "without MD", "mlc": "MLC only", "swav": "SwAV only",
    "mim": "MIM only", "mlc-md": "MLC and MD", "random": "random init", "pixels": "raw pixels (no backbone)",
}  # fmt: skip
BASELINES = {"random": "random-init", "pixels": "pixels"}  # rows without pre-training -> result folder suffix
SMOKE = ["train.max_steps=3", "train.ckpt_every=3", "data.batch_size=16", "data.train_size=48",
         "data.val_size=24", "eval.knn_every=0"]  # fmt: skip


def smoke_overrides(dataset: str) -> list[str]:
    """``SMOKE`` less the ``data.*`` keys ``dataset`` does not read (a manifest has its own size)."""
    from hvpmtl.data.config import has_effect

    return [o for o in SMOKE if not o.startswith("data.") or has_effect(o.split("=")[0].removeprefix("data."), dataset)]


@dataclass
class Evaluation:
    """One table column: a frozen-feature command and its arguments; its metric is ``mAP`` on
    multi-label data and ``top1`` on single-label data. ``mlc-head`` scores the run's own MLC
    head (no backbone evaluation): only mixes that train MLC have it."""

    name: str
    command: str  # knn | linprobe | mlc-head
    args: list[str] = field(default_factory=list)

    @property
    def slug(self) -> str:
        return self.name.lower().replace(" ", "-")


def evaluations(
    dataset: str, images: tuple[int, int], items: tuple[int, int] | None, mlc_head: bool = True
) -> list[Evaluation]:
    """The columns: a linear probe on the pre-training data's own held-out images (``dataset``,
    its tags) and (``mlc_head``) the MLC head's mAP on the same held-out images, then, with
    ``items``, k-NN and a linear probe on single Fashion-MNIST items. Items are shown at the size
    they have in ``fmnist-mosaic`` (half the image side, centred), the scale the backbone learnt;
    resized to the whole image they scored 6 points lower."""
    out = [Evaluation(f"probe {dataset}", "linprobe", [f"train_images={images[0]}", f"eval_images={images[1]}"])]
    if mlc_head:
        out.append(Evaluation("MLC head mAP", "mlc-head", [f"eval_images={images[1]}"]))
    if items:
        scale = ["data.item_scale=0.5"] if dataset == "fmnist-mosaic" else []
        sizes = ["-c", "fmnist", f"train_images={items[0]}", f"eval_images={items[1]}", *scale]
        out += [Evaluation("k-NN fmnist items", "knn", sizes), Evaluation("probe fmnist items", "linprobe", sizes)]
    return out


def mix_overrides(mix: str) -> list[str]:
    """``tasks.<t>.weight=0`` for each task ``mix`` switches off."""
    if mix not in MIXES:
        from hvpmtl.config import ConfigError

        raise ConfigError(f"unknown task mix {mix!r}; choose from {', '.join(MIXES)}")
    return [f"tasks.{t}.weight=0" for t in MIXES[mix]]


@dataclass
class Ablation:
    """The plan: ``mixes`` x ``seeds`` pre-trainings of ``preset`` + ``overrides`` under ``out``."""

    out: Path
    preset: str | None
    overrides: list[str]
    mixes: list[str]
    seeds: list[int]
    evals: list[Evaluation]
    launcher: str = ""  # e.g. "torchrun --nproc_per_node=8"; empty = in this process, by run_command
    run_command: Callable[[list[str]], int] | None = None  # runs `hvpmtl ARGV` here, returns its exit status

    def cell(self, mix: str, seed: int) -> Path:
        return self.out / f"{mix}-s{seed}"

    def pretrain_args(self, mix: str, seed: int) -> list[str]:
        return ["pretrain", *(["-c", self.preset] if self.preset else []), *self.overrides, *mix_overrides(mix),
                f"train.seed={seed}", f"train.output_dir={self.cell(mix, seed)}", "train.resume=auto"]  # fmt: skip

    def applies(self, ev: Evaluation, mix: str) -> bool:
        """Whether row ``mix`` has a value in column ``ev``: the MLC head only where MLC trained."""
        return ev.command != "mlc-head" or (mix not in BASELINES and "mlc" not in MIXES[mix])

    def eval_args(self, ev: Evaluation, mix: str, seed: int) -> list[str]:
        """``mix == "random"``: the first mix's run with ``--random-init`` (every mix of one seed
        starts from the same backbone weights); ``"pixels"``: the same evaluation on the
        normalised input pixels (logistic regression / k-NN on raw pixels, the floor a
        pre-trained backbone must clear)."""
        if ev.command == "mlc-head":  # writes <cell>/eval/mlc-head-<data>-<hash>-val<N>-student.json
            return [ev.command, str(self.cell(mix, seed)), *ev.args]
        source = self.cell(self.mixes[0] if mix in BASELINES else mix, seed)
        flags = ["--random-init"] if mix == "random" else []
        if mix == "pixels":
            flags = [f"{'knn' if ev.command == 'knn' else 'probe'}.feature=pixels"]
        return [ev.command, str(source), *flags, *ev.args, f"run.output_dir={self.result_dir(ev, mix, seed)}"]

    def result_dir(self, ev: Evaluation, mix: str, seed: int) -> Path:
        """A baseline's folder is in the first mix's cell, unless a cell of the same seed under
        ``out`` already holds it: every mix of a seed starts from the same weights, so a mix added
        to an earlier ablation reuses that ablation's random-init and raw-pixel results."""
        if ev.command == "mlc-head":
            return self.cell(mix, seed) / "eval"
        if mix in BASELINES:
            name = f"{ev.slug}-{BASELINES[mix]}"
            done = sorted(p.parent.parent.parent for p in self.out.glob(f"*-s{seed}/ablate/{name}/*.json"))
            return (done[0] if done else self.cell(self.mixes[0], seed)) / "ablate" / name
        return self.cell(mix, seed) / "ablate" / ev.slug

    def result(self, ev: Evaluation, mix: str, seed: int) -> float | None:
        if not self.applies(ev, mix):
            return None
        if ev.command == "mlc-head":  # the run's eval/ holds other results too: the one on these images
            asked = dict(a.split("=", 1) for a in ev.args).get("eval_images", "0")
            tail = f"(val {'all' if asked == '0' else asked})"
            files = sorted(self.result_dir(ev, mix, seed).glob("mlc-head-*-student.json"))
            records = [r for f in files if (r := json.loads(f.read_text())).get("data", "").endswith(tail)]
            return float(records[-1]["metrics"]["mAP"]) if records else None
        files = sorted(self.result_dir(ev, mix, seed).glob("*.json"))
        if not files:
            return None
        metrics = json.loads(files[-1].read_text())["metrics"]
        return float(metrics["mAP"] if "mAP" in metrics else metrics["top1"])

    def rows(self) -> list[str]:
        return [*self.mixes, *BASELINES]

    def run(self, log=print) -> None:
        """Every missing pre-training, then every missing evaluation; finished steps are skipped."""
        for seed in self.seeds:
            for mix in self.mixes:
                if not (self.cell(mix, seed) / "backbone.safetensors").is_file():
                    self._call(self.pretrain_args(mix, seed), log)
        for seed in self.seeds:
            for mix in self.rows():
                for ev in self.evals:
                    if self.applies(ev, mix) and self.result(ev, mix, seed) is None:
                        self._call(self.eval_args(ev, mix, seed), log)
        table = self.table()
        (self.out / "ablation.md").write_text(table + "\n")
        (self.out / "ablation.json").write_text(json.dumps(self.values(), indent=1) + "\n")
        log(table)

    def _call(self, argv: list[str], log) -> None:
        log("$ hvpmtl " + " ".join(shlex.quote(a) for a in argv))
        if self.launcher:  # mlc-head is one process's work (under torchrun every rank would write it)
            launcher = [sys.executable] if argv[0] == "mlc-head" else shlex.split(self.launcher)
            rc = subprocess.run([*launcher, "-m", "hvpmtl", *argv]).returncode
        elif self.run_command is not None:
            rc = self.run_command(argv)
        else:
            raise ValueError("Ablation: give run_command (e.g. hvpmtl.cli.main) or a launcher to run its steps")
        if rc:
            raise RuntimeError(f"ablate: this step failed (exit {rc}); fix it and run the same command again "
                               f"(finished steps are kept): hvpmtl {' '.join(argv)}")  # fmt: skip

    def values(self) -> dict[str, dict[str, list[float]]]:
        """``{row: {column: [value per seed that has one]}}``."""
        out = {}
        for mix in self.rows():
            out[mix] = {}
            for ev in self.evals:
                vals = [self.result(ev, mix, s) for s in self.seeds]
                out[mix][ev.name] = [v for v in vals if v is not None]
        return out

    def table(self) -> str:
        """Markdown: one row per mix, mean ± sample std over seeds; the best mean per column bold."""
        values = self.values()
        best = {ev.name: max((mean_std(v[ev.name])[0] for v in values.values() if v[ev.name]), default=None)
                for ev in self.evals}  # fmt: skip
        head = "| pre-training | " + " | ".join(ev.name for ev in self.evals) + " |"
        lines = [head, "|---|" + "---:|" * len(self.evals)]
        for mix, cols in values.items():
            cells = []
            for ev in self.evals:
                v = cols[ev.name]
                if not v:
                    cells.append("—")
                    continue
                m, s = mean_std(v)
                text = f"{m:.1f}" + (f" ± {s:.1f}" if len(v) > 1 else "")
                cells.append(f"**{text}**" if m == best[ev.name] else text)
            lines.append(f"| {LABELS.get(mix, mix)} | " + " | ".join(cells) + " |")
        seeds = ", ".join(map(str, self.seeds))
        lines.append(f"\n{len(self.seeds)} seed(s) ({seeds}); mean ± sample std. Metric: mAP on multi-label "
                     "data, top-1 on single-label data (%).")  # fmt: skip
        lead = self.lead_table()
        return "\n".join(lines) + (f"\n\n{lead}" if lead else "")

    def paired_differences(self, column: str, mix: str, other: str) -> list[float]:
        """``mix - other`` in ``column`` for each seed where both have a result (paired: every
        mix of one seed starts from the same weights and reads the same data)."""
        ev = next(e for e in self.evals if e.name == column)
        pairs = [(self.result(ev, mix, s), self.result(ev, other, s)) for s in self.seeds]
        return [a - b for a, b in pairs if a is not None and b is not None]

    def lead_table(self, mix: str = "full", bar: float = 1.0) -> str:
        """Does the combination win? Per column, the other pre-training closest to ``mix`` (the
        smallest mean paired difference over seeds), that lead (mean ± std), and whether ``mix``
        leads every other pre-training by at least ``bar`` points; then its lead over raw pixels.
        Empty when ``mix`` or no other pre-training is in the plan."""
        others = [m for m in self.mixes if m != mix]
        if mix not in self.mixes or not others:
            return ""
        name = LABELS.get(mix, mix).split(" (")[0]
        lines = [f"| column | closest other pre-training | lead of {name} (paired over seeds) "
                 f"| ≥ {bar:g} point over every other | lead over raw pixels |",
                 "|---|---|---:|:-:|---:|"]  # fmt: skip
        for ev in self.evals:
            rivals = [o for o in others if self.applies(ev, o)]  # the MLC head: the other MLC mixes
            leads = {o: d for o in rivals if (d := self.paired_differences(ev.name, mix, o))}
            if not leads:
                continue
            closest = min(leads, key=lambda o: mean_std(leads[o])[0])
            m, s = mean_std(leads[closest])
            complete = len(leads) == len(rivals)
            verdict = ("yes" if m >= bar else "no") if complete else "— (cells missing)"
            pix = self.paired_differences(ev.name, mix, "pixels")
            pixels = f"{mean_std(pix)[0]:+.1f}" if pix else "—"
            spread = f" ± {s:.1f}" if len(leads[closest]) > 1 else ""
            lines.append(f"| {ev.name} | {LABELS.get(closest, closest)} | {m:+.1f}{spread} | {verdict} | {pixels} |")
        return "\n".join(lines) if len(lines) > 2 else ""


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
