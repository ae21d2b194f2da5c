"""The end-of-run table and the progress bar (engine/metrics.py): losses compared after warm-up,
bounded quantities shown as values, progress counted in steps."""

from __future__ import annotations

import re

from hvpmtl.engine.metrics import MetricsLogger, format_summary, summarize

KEYS = ("loss", "loss_mlc", "loss_distill", "swav_collapse", "grad_share_mlc", "grad_cos_mlc_swav")


def _rows(steps: int) -> list[dict]:
    """Losses that rise during 4 warm-up steps then fall; distillation that starts at 0."""
    rows = []
    for s in range(1, steps + 1):
        loss = 1.0 + s if s <= 4 else 10.0 - s
        bounded = {"swav_collapse": 0.5, "grad_share_mlc": 0.1 * (s % 3), "grad_cos_mlc_swav": -0.01 * s}
        rows.append({"step": float(s), "loss": loss, "loss_mlc": loss / 2, "loss_distill": 0.001 * s, **bounded})
    return rows


def _row(table: str, key: str) -> list[str]:
    return next(line.split() for line in table.splitlines() if line.split()[:1] == [key])


def test_losses_are_compared_from_the_first_step_after_warm_up():
    rows = _rows(8)  # loss 2 3 4 5 | 5 4 3 2
    table = format_summary(summarize(rows, KEYS, window=1, warmup_steps=4), 8, 0, 1.0, 10.0)
    assert _row(table, "loss") == ["loss", "5", "2", "-60.0%"]  # step 5 -> step 8, not step 1 (2) -> 8
    assert _row(table, "loss_mlc")[-1] == "-60.0%"
    assert "losses compared from step 5, the first after the 4 warm-up steps" in table


def test_bounded_quantities_and_distillation_show_values_not_changes():
    table = format_summary(summarize(_rows(8), KEYS, window=1, warmup_steps=4), 8, 0, 1.0, 10.0)
    for key in ("loss_distill", "swav_collapse", "grad_share_mlc", "grad_cos_mlc_swav"):
        row = _row(table, key)
        assert len(row) == 3 and not any("%" in cell for cell in row), row  # name, start, end
    assert _row(table, "grad_cos_mlc_swav")[1:] == ["-0.01", "-0.08"]  # the run's first and last values
    assert "%" not in table.split("\n", 1)[1].replace("-60.0%", "")


def test_a_run_that_ends_within_warm_up_says_so_instead_of_a_change():
    table = format_summary(summarize(_rows(3), KEYS, window=1, warmup_steps=4), 3, 0, 1.0, 10.0)
    assert "%" not in table
    assert _row(table, "loss")[1:] == ["2", "4", "—"]
    assert "run ended within the 4 warm-up steps: no loss comparison" in table


def test_without_warm_up_every_row_counts():
    table = format_summary(summarize(_rows(3), ("loss",), window=1), 3, 0, 1.0, 10.0)
    assert _row(table, "loss") == ["loss", "2", "4", "+100.0%"]
    assert "warm-up" not in table


def test_progress_bar_counts_steps_and_shows_images_per_second(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, ("loss",), 10, 2, 8, loggers=())
    rows = [{"step": float(s), "loss": 1.0, "skipped_steps": 0.0, "img_per_s": 123.0} for s in (3, 4)]
    logger.log(rows)
    logger.bar.refresh()
    logger.close()
    err = capsys.readouterr().err
    assert "4/10" in err and "step" in err and "img/s=123" in err


def test_progress_bar_measures_images_per_second_when_rows_lack_it(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, ("loss",), 10, 0, 8, loggers=())
    logger.bar.start_t -= 2.0  # two seconds into the run: 3 steps of 8 images = 12 img/s
    logger.log([{"step": float(s), "loss": 1.0, "skipped_steps": 0.0} for s in (1, 2, 3)])
    logger.bar.refresh()
    logger.close()
    speeds = [int(v) for v in re.findall(r"img/s=(\d+)", capsys.readouterr().err)]
    assert speeds and 8 <= speeds[-1] <= 12, speeds  # 24 images over 2 s and the test's own time
