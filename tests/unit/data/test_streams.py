"""mimscale.data.streams, the dispatcher: each data.source reaches its reader with the same batches
as calling that reader directly. (WebDataset positions and resume: test_wds_loader.py; FFCV:
test_ffcv_loader.py; the whole-image pass across ranks: test_amt.py.)"""
from __future__ import annotations

import sys

import pytest
import torch

from mimscale.config import DataConfig
from mimscale.data.full_pass import whole_image_loader
from mimscale.data.loader import build_loader
from mimscale.data.sources import FfcvFile, FolderSource, SyntheticSource
from mimscale.data.streams import SOURCES, build_source, open_full_pass, open_stream


def _cfg(**kw) -> DataConfig:
    return DataConfig(**{"source": "synthetic", "synthetic_count": 20, "synthetic_size": 32, "num_workers": 0, **kw})


def _equal_batches(a, b, n: int) -> None:
    ia, ib = iter(a), iter(b)
    for _ in range(n):
        x, y = next(ia), next(ib)
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_build_source_kinds(tmp_path):
    assert SOURCES == ("synthetic", "folder", "wds", "ffcv")
    src = build_source(_cfg(), seed=2)
    assert isinstance(src, SyntheticSource) and src.seed == 1236 and len(src) == 20
    (tmp_path / "train" / "n1").mkdir(parents=True)
    (tmp_path / "train" / "n1" / "a.JPEG").write_bytes(b"x")
    assert isinstance(build_source(_cfg(source="folder", path=str(tmp_path))), FolderSource)
    with pytest.raises(FileNotFoundError, match="data_prep.wds"):
        build_source(_cfg(source="wds", path=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="not an FFCV file"):
        build_source(_cfg(source="ffcv", path=str(tmp_path / "none.beton")))
    bad = _cfg()
    bad.source = "nope"  # config validation would refuse it first; the dispatcher names the values too
    with pytest.raises(ValueError, match="allowed values: synthetic, folder, wds, ffcv"):
        build_source(bad)
    assert FfcvFile.__module__ == "mimscale.data.sources"


def test_open_stream_is_the_indexed_loader():
    cfg = _cfg()
    src = build_source(cfg, seed=1)
    loader, _ = build_loader(cfg, img_size=16, micro_batch=4, rank=1, world_size=2, seed=1, start_micro_batch=3, source=src)
    _equal_batches(open_stream(cfg, src, img_size=16, micro_batch=4, rank=1, world_size=2, seed=1, start_micro_batch=3), loader, 3)


def test_open_full_pass_is_the_whole_image_loader():
    cfg = _cfg()
    src = build_source(cfg)
    _equal_batches(open_full_pass(cfg, src, img_size=16, batch_size=3, rank=0, world_size=2), whole_image_loader(src, 16, 3, 0, 2), 4)


def test_importing_the_dispatcher_does_not_import_ffcv():
    """FFCV (numba start-up, an optional extra) is imported only when data.source is ffcv."""
    import subprocess

    code = "import sys, mimscale.data.streams; print('ffcv' in sys.modules or 'numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
