"""One registry of data sources (hvpmtl.data.sources) and one image-loading value (hvpmtl.data.loading)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

import hvpmtl
from hvpmtl.data import (
    DataConfig,
    ImageFiles,
    ImageLoading,
    ManifestImages,
    SyntheticScenes,
    build_dataset,
    build_pretrain_dataset,
    reduced_decode_side,
    sources,
)
from hvpmtl.data.config import DATASETS, FORMATS, SOURCE_SPECIFIC_KEYS
from hvpmtl.data.formats import READERS
from hvpmtl.data.loading import BadImages
from hvpmtl.data.shard_writer import write_shards
from hvpmtl.data.skipped import merge_skipped_images
from hvpmtl.data.sources import Source, register_source, registered_source, registered_sources
from hvpmtl.data.views import pretrain_loading


def test_every_data_dataset_value_has_one_registered_builder():
    sources = registered_sources()
    assert list(sources) == list(DATASETS)  # the config's list and the registry agree, in order
    assert sorted(READERS) == sorted(FORMATS)
    for key, names in SOURCE_SPECIFIC_KEYS.items():
        assert set(names) <= set(sources), key
        assert all(key in sources[n].keys for n in names) and all(
            key not in s.keys for n, s in sources.items() if n not in names
        ), key
    assert sources["voc"].keys[:3] == ("annotations", "val_annotations", "voc_difficult")


def test_register_source_refuses_an_undeclared_name_and_a_second_builder():
    with pytest.raises(ValueError, match=r"register_source\('parquet'\): not a data.dataset value .*DATASETS"):
        register_source("parquet")(lambda cfg, split, img_size, loading: None)
    with pytest.raises(ValueError, match=r"register_source\('voc'\): registered already by hvpmtl.data.formats"):
        register_source("voc")(lambda cfg, split, img_size, loading: None)
    with pytest.raises(ValueError, match=r"data.dataset: unknown 'parquet' \(choose from synthetic, "):
        registered_source("parquet")


def test_build_dataset_calls_the_registered_builder(monkeypatch):
    calls = []

    def build(cfg, split, img_size, loading):
        calls.append((cfg.dataset, split, img_size, loading))
        return SyntheticScenes(3, img_size)

    monkeypatch.setitem(sources._SOURCES, "synthetic", Source("synthetic", build, ()))
    loading = ImageLoading(on_bad_image="skip")
    assert len(build_dataset(DataConfig(), 16, "val", loading)) == 3
    build_dataset(DataConfig(max_image_pixels=7), 8)
    assert calls == [("synthetic", "val", 16, loading), ("synthetic", "train", 8, ImageLoading(max_pixels=7))]


def test_image_loading_from_config_and_its_errors():
    data = DataConfig(on_bad_image="skip", max_image_pixels=1000, io_threads=3)
    assert ImageLoading.from_config(data, 64, "runs/x") == ImageLoading("skip", 1000, 64, 3, Path("runs/x"))
    with pytest.raises(ValueError, match="on_bad_image='ignore' must be 'error' or 'skip'"):
        ImageLoading(on_bad_image="ignore")
    with pytest.raises(TypeError, match=r"loading='skip': expected an ImageLoading"):
        ImageFiles(["a.png"], [[0]], ["a"], "skip")  # the former on_bad_image argument


@pytest.fixture
def bad_manifest(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "img" / "0.png")
    (tmp_path / "img" / "1.png").write_bytes(b"not a png")
    Image.new("RGB", (40, 40), (10, 200, 10)).save(tmp_path / "img" / "2.png")
    (tmp_path / "m.csv").write_text("path,labels\nimg/0.png,a\nimg/1.png,b\nimg/2.png,a\n")
    return tmp_path / "m.csv"


class _Readable:
    """Images 0 and 2 of ``bad_manifest`` (1 is unreadable), as a data set to write as shards."""

    def __init__(self, ds: ManifestImages):
        self.classes, self.items = ds.classes, [ds[0], ds[2], ds[0]]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {**self.items[i], "index": i}


def test_pretraining_builds_every_reader_with_one_loading(bad_manifest: Path, tmp_path: Path):
    run = tmp_path / "run"
    common = ["backbone.img_size=32", "tasks.mim.mask_patch_size=16", f"train.output_dir={run}",
              "data.on_bad_image=skip", "data.reduced_decode=true", "data.batch_size=3"]  # fmt: skip
    cfg = hvpmtl.load_config(None, [*common, "data.dataset=manifest", f"data.manifest={bad_manifest}",
                                    "data.io_threads=2"])  # fmt: skip
    views = build_pretrain_dataset(cfg)
    side = reduced_decode_side(cfg)
    assert side > 0 and views.base.loading == pretrain_loading(cfg) == ImageLoading("skip", 89_478_485, side, 2, run)
    index = write_shards(_Readable(ManifestImages(bad_manifest)), tmp_path / "shards", samples_per_shard=3)
    sharded = hvpmtl.load_config(None, [*common, "data.dataset=shards", f"data.shards={index.origin}",
                                        "data.shard_streams=1"])  # fmt: skip
    stream = build_pretrain_dataset(sharded)
    assert stream.loading == pretrain_loading(sharded) == ImageLoading("skip", 89_478_485, side, 0, run)
    assert type(stream.bad_images) is type(views.base.bad_images) is BadImages  # one policy, one code path
    with pytest.warns(UserWarning, match=r"m\.csv:3: skipping unreadable image .*1\.png"):
        views[(1, 0)]
    assert views.base.num_skipped == 1 and views.base.skipped_files == {str(bad_manifest.parent / "img" / "1.png")}
    assert list(merge_skipped_images(run)) == [str(bad_manifest.parent / "img" / "1.png")]  # the run's list
