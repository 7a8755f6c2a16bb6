"""data_prep: image preparation, WebDataset shards, FFCV file, verify (the listing they use:
test_data_imagenet.py)."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from data_prep import verify as verify_mod
from data_prep.ffcv import write_beton
from data_prep.images import Unusable, prepare_array, prepare_jpeg, target_size
from data_prep.manifest import sha256_file
from data_prep.wds import OptionsMismatch, sample_order, write_shards
from mimscale.data.imagenet import list_split
from mimscale.data.sources import FolderSource
from tests.unit.data.test_imagenet import flat_val, write_kaggle_csv

REPO = Path(__file__).resolve().parents[3]
SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample"
needs_sample = pytest.mark.skipif(not (SAMPLE / "train").is_dir(), reason=f"{SAMPLE} not present")


# ----------------------------------------------------------------------------------------------
# helpers


def _encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colours plus a little noise: compresses like a photo, differs per seed."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    a = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), np.full_like(x, 40 * (seed % 6))], -1)
    a = np.clip(a + rng.integers(-8, 9, a.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def _read_shards(folder: Path, split: str = "train") -> list[tuple[str, list[tarfile.TarInfo], dict]]:
    """[(shard name, members, {name: bytes})] in shard order."""
    out = []
    for path in sorted(folder.glob(f"{split}-*.tar")):
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            out.append((path.name, members, {m.name: tar.extractfile(m).read() for m in members}))
    return out


def _samples(folder: Path, split: str = "train") -> list[dict]:
    """Every sample of every shard, in file order: {"shard", "key", "jpg", "cls", "json"}."""
    rows = []
    for name, members, data in _read_shards(folder, split):
        names = [m.name for m in members]
        assert len(names) % 3 == 0
        for i in range(0, len(names), 3):
            key = names[i][:-4]
            assert names[i:i + 3] == [f"{key}.jpg", f"{key}.cls", f"{key}.json"]
            rows.append({"shard": name, "key": key, "jpg": data[f"{key}.jpg"], "cls": int(data[f"{key}.cls"]),
                         "json": json.loads(data[f"{key}.json"])})
    return rows


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


BAD_TREE = {  # name -> (bytes maker, expected outcome)
    "a_truncated.JPEG": "skip",
    "b_empty.JPEG": "skip",
    "c_random.JPEG": "skip",
    "d_cmyk.JPEG": "convert",
    "e_gray.JPEG": "convert",
    "f_png.JPEG": "convert",
    "g_rgba.JPEG": "convert",
    "h_stray.JPEG": "convert",
    "i_ok.JPEG": "keep",
}


def _bad_bytes(name: str) -> bytes:
    pic = _picture(64, 48, seed=len(name))
    good = _encode(pic, quality=90)
    if name.startswith("a_"):
        return good[: len(good) // 2]
    if name.startswith("b_"):
        return b""
    if name.startswith("c_"):
        return np.random.default_rng(1).bytes(3000)
    if name.startswith("d_"):
        return _encode(pic.convert("CMYK"), quality=95)
    if name.startswith("e_"):
        return _encode(pic.convert("L"), quality=90)
    if name.startswith("f_"):
        return _encode(pic, "PNG")
    if name.startswith("g_"):
        return _encode(pic.convert("RGBA"), "PNG")
    if name.startswith("h_"):  # libjpeg warns about stray bytes before a marker; PIL reads it
        sos = good.index(b"\xff\xda")
        return good[:sos] + b"\x00\x00" + good[sos:]
    return good


def _make_bad_tree(root: Path) -> Path:
    for ci, wnid in enumerate(["n00000001", "n00000002"]):
        d = root / "train" / wnid
        d.mkdir(parents=True)
        for name in BAD_TREE:
            (d / f"{ci}{name}").write_bytes(_bad_bytes(name))
    return root


# ----------------------------------------------------------------------------------------------
# fixtures on the real sample (module scope: each conversion runs once)


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory) -> Path:
    if not (SAMPLE / "train").is_dir():
        pytest.skip(f"{SAMPLE} not present")
    root = tmp_path_factory.mktemp("imagenet")
    shutil.copytree(SAMPLE, root, dirs_exist_ok=True)
    return root


@pytest.fixture(scope="module")
def gray_files(sample_root) -> set[str]:
    """Relative paths of the sample's grayscale JPEGs, found independently of data_prep."""
    out = set()
    for p in (sample_root / "train").glob("*/*"):
        with Image.open(p) as img:
            if img.mode == "L":
                out.add(f"{p.parent.name}/{p.name}")
    return out


@pytest.fixture(scope="module")
def wds_run(sample_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("wds") / "A"
    manifest = write_shards(sample_root, "train", out, shard_size=300, workers=2, progress=False)
    return out, manifest


@pytest.fixture(scope="module")
def beton_run(sample_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ffcv") / "train.beton"
    manifest = write_beton(sample_root, "train", out, max_side=128, workers=2, progress=False)
    return out, manifest


# ----------------------------------------------------------------------------------------------
# listing (mimscale.data.imagenet; its own tests are in test_data_imagenet.py)


def test_flat_val_shards_follow_the_listing(tmp_path):
    """Val shards come in sorted index order, with the listing's labels."""
    truth = flat_val(tmp_path)
    write_kaggle_csv(tmp_path, truth)
    for i, name in enumerate(truth):  # decodable images: the writer skips anything else
        (tmp_path / "val" / name).write_bytes(_encode(_picture(16, 12, i)))
    listing = list_split(tmp_path, "val")
    out = tmp_path / "shards"
    write_shards(tmp_path, "val", out, shard_size=2, workers=1, progress=False)
    rows = _samples(out, "val")
    assert [r["json"]["index"] for r in rows] == list(range(5))
    assert [r["json"]["wnid"] for r in rows] == [truth[f] for f in sorted(truth)]
    assert [r["cls"] for r in rows] == listing.labels.tolist()


# ----------------------------------------------------------------------------------------------
# image preparation


def test_prepare_decisions():
    for name, outcome in BAD_TREE.items():
        data = _bad_bytes(name)
        if outcome == "skip":
            with pytest.raises(Unusable) as e:
                prepare_jpeg(data)
            assert str(e.value), name
            with pytest.raises(Unusable):
                prepare_array(data)
            continue
        prep = prepare_jpeg(data)
        assert (prep.width, prep.height) == (64, 48), name
        assert simplejpeg.decode_jpeg_header(prep.data)[2] == "YCbCr", name
        assert simplejpeg.decode_jpeg(prep.data, strict=True).shape == (48, 64, 3), name
        if outcome == "keep":
            assert prep.converted is None and prep.data == data
        else:
            assert prep.converted and prep.data != data, name
        assert prepare_array(data).array.shape == (48, 64, 3)
    # CMYK is converted with the right colours (Adobe's inverted CMYK handled).
    data = _bad_bytes("d_cmyk.JPEG")
    ref = np.asarray(_picture(64, 48, seed=len("d_cmyk.JPEG")), dtype=np.int16)
    assert np.abs(prepare_array(data).array.astype(np.int16) - ref).mean() < 6


def test_max_side_resizes_and_keeps_original_size(tmp_path):
    assert target_size(300, 200, 100) == (100, 67)
    assert target_size(120, 500, 100) == (24, 100)
    assert target_size(90, 60, 100) == (90, 60)
    assert target_size(90, 60, None) == (90, 60)
    for wnid, (w, h) in {"n1": (300, 200), "n2": (120, 500), "n3": (90, 60)}.items():
        (tmp_path / "train" / wnid).mkdir(parents=True)
        (tmp_path / "train" / wnid / "x.JPEG").write_bytes(_encode(_picture(w, h, seed=w), quality=90))
    (tmp_path / "train" / "n4").mkdir()
    (tmp_path / "train" / "n4" / "gray.JPEG").write_bytes(_encode(_picture(400, 100).convert("L")))
    out = tmp_path / "out"
    m = write_shards(tmp_path, "train", out, shard_size=10, max_side=100, workers=1, progress=False)
    rows = {r["json"]["file"]: r for r in _samples(out)}
    expect = {"n1/x.JPEG": (300, 200, (67, 100)), "n2/x.JPEG": (120, 500, (100, 24)),
              "n3/x.JPEG": (90, 60, (60, 90)), "n4/gray.JPEG": (400, 100, (25, 100))}
    for rel, (w, h, shape) in expect.items():
        r = rows[rel]
        assert (r["json"]["width"], r["json"]["height"]) == (w, h)
        assert simplejpeg.decode_jpeg(r["jpg"]).shape[:2] == shape
    assert rows["n3/x.JPEG"]["jpg"] == (tmp_path / "train" / "n3" / "x.JPEG").read_bytes()  # small: untouched
    assert [e["file"] for e in m["converted"]] == ["n4/gray.JPEG"]  # a resize alone is no conversion
    assert m["max_side"] == 100
    arr = prepare_array((tmp_path / "train" / "n2" / "x.JPEG").read_bytes(), 100)
    assert arr.array.shape == (100, 24, 3) and (arr.width, arr.height) == (120, 500)


# ----------------------------------------------------------------------------------------------
# WebDataset on the real sample


def test_wds_round_trip(sample_root, wds_run, gray_files):
    out, m = wds_run
    fs = FolderSource(sample_root, "train")
    rows = _samples(out)
    assert m["num_samples"] == m["num_files"] == len(rows) == 1000
    assert [s["count"] for s in m["shards"]] == [300, 300, 300, 100]
    # Shard k holds permutation(1000)[k*300:(k+1)*300], in that order.
    assert [r["json"]["index"] for r in rows] == sample_order(1000, "train", 0).tolist()
    assert rows[0]["shard"] == "train-000000.tar" and rows[-1]["shard"] == "train-000003.tar"
    assert sorted(r["json"]["index"] for r in rows) == list(range(1000))
    converted = {e["file"] for e in m["converted"]}
    assert converted == gray_files and len(gray_files) == 23
    assert m["skipped"] == []
    assert m["classes"] == FolderSource(SAMPLE, "train").classes
    for r in rows:
        i = r["json"]["index"]
        assert r["key"] == f"{i:08d}"
        assert r["cls"] == fs.label(i)
        assert r["json"]["file"] == fs.relpath(i) and r["json"]["wnid"] == m["classes"][r["cls"]]
        src = fs.read(i)
        h, w, _, _ = simplejpeg.decode_jpeg_header(src)
        assert (r["json"]["width"], r["json"]["height"]) == (w, h)
        if r["json"]["file"] in gray_files:
            assert r["json"]["converted"] == "grayscale JPEG"
            assert simplejpeg.decode_jpeg_header(r["jpg"])[2] == "YCbCr"
            assert simplejpeg.decode_jpeg(r["jpg"]).shape == (h, w, 3)
        else:
            assert "converted" not in r["json"]
            assert r["jpg"] == src
    # Deterministic headers, sidecars that match the shards.
    for name, members, _ in _read_shards(out):
        assert all((t.mtime, t.uid, t.gid, t.uname, t.gname, t.mode) == (0, 0, 0, "", "", 0o444) for t in members)
        side = json.loads((out / (name + ".json")).read_text())
        assert (side["sha256"], side["bytes"]) == sha256_file(out / name)
    assert not list(out.glob("*.tmp"))


def test_wds_readable_by_webdataset(wds_run):
    import webdataset

    out, _ = wds_run
    ds = webdataset.WebDataset([str(p) for p in sorted(out.glob("train-*.tar"))], shardshuffle=False)
    keys = [(s["__key__"], int(s["cls"]), json.loads(s["json"])["index"]) for s in ds]
    assert len(keys) == 1000
    assert all(k == f"{i:08d}" for k, _, i in keys)


def test_wds_rerun_after_interruption_is_byte_identical(sample_root, wds_run, tmp_path):
    a, _ = wds_run
    b = tmp_path / "B"
    shutil.copytree(a, b)
    kept_mtime = (b / "train-000000.tar").stat().st_mtime_ns
    # An interrupted run: shard 1 never started, shard 2's sidecar never written, shard 3 half
    # written to its .tmp, a sidecar .tmp left over, no manifest.
    for name in ["train-000001.tar", "train-000001.tar.json", "train-000002.tar.json", "train-manifest.json"]:
        (b / name).unlink()
    data = (b / "train-000003.tar").read_bytes()
    (b / "train-000003.tar").unlink()
    (b / "train-000003.tar.json").unlink()
    (b / "train-000003.tar.tmp").write_bytes(data[: len(data) // 3])
    (b / "train-000002.tar.json.tmp").write_bytes(b'{"name": "train-0000')
    (b / "train-000000.tar.tmp").write_bytes(data[:1000])  # stale, next to a complete shard
    m = write_shards(sample_root, "train", b, shard_size=300, workers=2, progress=False)
    assert m["num_samples"] == 1000
    assert _files(b) == _files(a)
    assert (b / "train-000000.tar").stat().st_mtime_ns == kept_mtime  # complete shard kept, not rewritten


def test_wds_rerun_with_other_options_is_refused(sample_root, wds_run, tmp_path):
    a, _ = wds_run
    b = tmp_path / "B"
    shutil.copytree(a, b)
    before = _files(b)
    for kw in [dict(shard_size=200), dict(max_side=256), dict(seed=1), dict(jpeg_quality=90), dict(reencode=True)]:
        args = dict(shard_size=300, workers=1, progress=False) | kw
        with pytest.raises(OptionsMismatch, match=next(iter(kw))):
            write_shards(sample_root, "train", b, **args)
    # Another source listing (a file fewer) is refused too, even with the manifest gone.
    (b / "train-manifest.json").unlink()
    src = tmp_path / "src"
    shutil.copytree(sample_root, src)
    next((src / "train").glob("*/*")).unlink()
    with pytest.raises(OptionsMismatch, match="num_files"):
        write_shards(src, "train", b, shard_size=300, workers=1, progress=False)
    before.pop("train-manifest.json")
    assert _files(b) == before


def test_verify_passes_on_wds_and_catches_corruption(wds_run, tmp_path, capsys):
    a, _ = wds_run
    assert verify_mod.main([str(a), "--workers", "2"]) == 0
    assert "ok: 1000 samples" in capsys.readouterr().out
    c = tmp_path / "C"
    shutil.copytree(a, c)
    # Shard 1: a JPEG member whose first bytes are overwritten (no longer a JPEG), and flipped
    # bytes inside another one. Shard 2: truncated. A stray shard no manifest lists.
    with tarfile.open(c / "train-000001.tar") as tar:
        jpgs = [t for t in tar.getmembers() if t.name.endswith(".jpg")]
    blob = bytearray((c / "train-000001.tar").read_bytes())
    blob[jpgs[5].offset_data:jpgs[5].offset_data + 16] = bytes(16)
    mid = jpgs[9].offset_data + jpgs[9].size // 2
    blob[mid:mid + 8] = bytes(x ^ 0xFF for x in blob[mid:mid + 8])
    (c / "train-000001.tar").write_bytes(bytes(blob))
    data = (c / "train-000002.tar").read_bytes()
    (c / "train-000002.tar").write_bytes(data[: len(data) // 2 + 100])
    shutil.copy(a / "train-000003.tar", c / "train-000099.tar")
    rc = verify_mod.main([str(c), "--workers", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 1
    assert any(line.startswith("train-000001.tar: sha256") for line in lines)
    assert any(line.startswith(f"train-000001.tar: {jpgs[5].name[:-4]}: not JPEG data") for line in lines)
    assert any(line.startswith("train-000002.tar:") and "samples, manifest says 300" in line for line in lines)
    assert any(line.startswith("train-000099.tar: shard file in no manifest") for line in lines)
    assert not any(line.startswith(("train-000000.tar", "train-000003.tar")) for line in lines)


# ----------------------------------------------------------------------------------------------
# FFCV on the real sample


def test_ffcv_round_trip_and_verify(sample_root, beton_run, gray_files, tmp_path, capsys):
    from ffcv.reader import Reader

    out, m = beton_run
    fs = FolderSource(sample_root, "train")
    assert m["num_samples"] == m["num_files"] == 1000 and m["skipped"] == []
    assert {e["file"] for e in m["converted"]} == gray_files
    assert (m["sha256"], m["bytes"]) == sha256_file(out)
    assert json.loads(Path(str(out) + ".json").read_text()) == m
    r = Reader(str(out))
    assert list(r.field_names) == ["image", "label", "index"]
    md = r.metadata
    np.testing.assert_array_equal(md["f2"], np.arange(1000))
    np.testing.assert_array_equal(md["f1"], fs.labels)
    for i in range(0, 1000, 37):
        h, w, _, _ = simplejpeg.decode_jpeg_header(fs.read(i))
        assert (md["f0"]["width"][i], md["f0"]["height"][i]) == target_size(w, h, 128)
    assert verify_mod.main([str(out), "--workers", "2"]) == 0
    assert "ok: 1000 samples" in capsys.readouterr().out

    # A flipped byte anywhere: the checksum names the file.
    bad = tmp_path / "bad.beton"
    blob = bytearray(out.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    bad.write_bytes(bytes(blob))
    shutil.copy(str(out) + ".json", str(bad) + ".json")
    assert verify_mod.main([str(bad), "--workers", "2"]) == 1
    assert "bad.beton: sha256 differs" in capsys.readouterr().out

    # A broken image with a matching checksum: only decoding every image can find it.
    ptr = int(md["f0"]["data_ptr"][17])
    blob = bytearray(out.read_bytes())
    blob[ptr:ptr + 16] = bytes(16)
    bad.write_bytes(bytes(blob))
    side = dict(m, sha256=sha256_file(bad)[0])
    Path(str(bad) + ".json").write_text(json.dumps(side))
    assert verify_mod.main([str(bad), "--workers", "2"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("bad.beton: sample 17: not JPEG data") for line in lines)
    assert not any("sha256" in line for line in lines)


# ----------------------------------------------------------------------------------------------
# bad input files


def test_bad_inputs_wds_and_ffcv(tmp_path):
    root = _make_bad_tree(tmp_path / "src")
    listing = list_split(root, "train")
    n = len(listing)
    assert n == 2 * len(BAD_TREE)
    out = tmp_path / "wds"
    m = write_shards(root, "train", out, shard_size=4, workers=2, progress=False)
    by_outcome = {o: sorted(f"{c}{name}" for c in "01" for name, oc in BAD_TREE.items() if oc == o)
                  for o in ("skip", "convert", "keep")}
    assert sorted(e["file"].split("/")[1] for e in m["skipped"]) == by_outcome["skip"]
    assert sorted(e["file"].split("/")[1] for e in m["converted"]) == by_outcome["convert"]
    assert all(e["reason"] for e in m["skipped"] + m["converted"])
    assert m["num_samples"] == n - len(by_outcome["skip"]) and m["num_files"] == n
    assert len(m["shards"]) == 5
    assert sum(s["count"] for s in m["shards"]) == m["num_samples"]
    rows = _samples(out)
    order = sample_order(n, "train", 0).tolist()
    skipped = {e["index"] for e in m["skipped"]}
    assert [r["json"]["index"] for r in rows] == [i for i in order if i not in skipped]
    for r in rows:
        assert simplejpeg.decode_jpeg_header(r["jpg"])[2] == "YCbCr"
        assert simplejpeg.decode_jpeg(r["jpg"], strict=True).shape == (48, 64, 3)
        assert ("converted" in r["json"]) == (r["json"]["file"].split("/")[1] in by_outcome["convert"])
    problems, samples = verify_mod.verify(out, workers=2)
    assert problems == [] and samples == m["num_samples"]

    beton = tmp_path / "bad.beton"
    mf = write_beton(root, "train", beton, workers=2, progress=False)
    assert [e["index"] for e in mf["skipped"]] == sorted(skipped)
    assert [e["file"] for e in mf["converted"]] == [e["file"] for e in m["converted"]]
    assert mf["num_samples"] == m["num_samples"]
    from ffcv.reader import Reader

    md = Reader(str(beton)).metadata
    assert md["f2"].tolist() == [i for i in range(n) if i not in skipped]
    assert md["f1"].tolist() == [int(listing.labels[i]) for i in md["f2"]]
    assert verify_mod.verify(beton, workers=2) == ([], m["num_samples"])


def test_wds_cli(tmp_path):
    root = _make_bad_tree(tmp_path / "src")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_prep.wds", "--src", str(root), "--split", "train", "--out", str(out),
           "--shard-size", "8", "--workers", "2"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1].startswith("wrote 12 samples in 3 shards (10 converted, 6 skipped)")
    p = subprocess.run(cmd[:-3] + ["--seed", "5"] + cmd[-2:], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "seed" in p.stderr
    p = subprocess.run([sys.executable, "-m", "data_prep.verify", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout


def test_ffcv_file_changed_after_prepass_fails_cleanly(tmp_path, monkeypatch):
    """A failure inside FFCV's writer processes must not hang the parent or leave a .beton."""
    import data_prep.ffcv as ffcv_mod

    root = _make_bad_tree(tmp_path / "src")

    def broken(data, max_side=None):
        raise Unusable("changed on disk")

    monkeypatch.setattr(ffcv_mod, "prepare_array", broken)  # inherited by the forked writers
    out = tmp_path / "x.beton"
    with pytest.raises(ffcv_mod.SourceChanged):
        write_beton(root, "train", out, workers=2, progress=False)
    assert list(tmp_path.glob("x.beton*")) == []


def test_ffcv_proportion_and_raw_write_modes(tmp_path):
    """FFCV's ImageNet recipe (some images raw, the rest JPEG): both kinds land in the file, the
    sidecar names the mode, verify reads both, and a wrong mode names the allowed ones."""
    from ffcv.reader import Reader

    root = tmp_path / "src"
    for i in range(24):
        d = root / "train" / f"n{i % 2:08d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img{i}.JPEG").write_bytes(_encode(_picture(40 + i, 30, seed=i)))
    modes = {}
    for mode in ("proportion", "raw"):
        beton = tmp_path / f"{mode}.beton"
        m = write_beton(root, "train", beton, workers=1, progress=False, write_mode=mode, compress_probability=0.5)
        assert m["write_mode"] == mode and m["num_samples"] == 24
        assert m["compress_probability"] == (0.5 if mode == "proportion" else None)
        modes[mode] = set(Reader(str(beton)).metadata["f0"]["mode"].tolist())
        assert verify_mod.verify(beton, workers=1) == ([], 24)
    assert modes["raw"] == {1}  # FFCV's codes: 0 jpg, 1 raw
    assert modes["proportion"] == {0, 1}  # 24 coin flips at 0.5: both kinds (all one kind: 2 in 2^24)
    with pytest.raises(ValueError, match="allowed values: jpg, proportion, raw"):
        write_beton(root, "train", tmp_path / "x.beton", workers=1, progress=False, write_mode="png")


def test_wds_reencode_writes_420_jpegs_at_the_quality(tmp_path):
    """--reencode: every image (kept, converted or resized alike) is a 4:2:0 JPEG at --jpeg-quality,
    FFCV's writer's encoding; the manifest says so and the pixels stay close to the source."""
    root = tmp_path / "src"
    for i in range(6):
        d = root / "train" / f"n{i % 2:08d}"
        d.mkdir(parents=True, exist_ok=True)
        img = _picture(64 + i, 48, seed=i)
        (d / f"img{i}.JPEG").write_bytes(_encode(img, quality=98, subsampling=0) if i != 5 else _encode(img, "PNG"))
    m = write_shards(root, "train", tmp_path / "out", shard_size=4, workers=1, progress=False, jpeg_quality=85, reencode=True)
    assert m["reencode"] is True and m["num_samples"] == 6 and len(m["converted"]) == 1  # the PNG
    rows = _samples(tmp_path / "out")
    assert len(rows) == 6
    for r in rows:
        h, w, colorspace, subsampling = simplejpeg.decode_jpeg_header(r["jpg"])
        assert (colorspace, subsampling) == ("YCbCr", "420"), r["json"]
        src = np.asarray(Image.open(root / "train" / r["json"]["file"]).convert("RGB"), dtype=np.float64)
        assert np.abs(simplejpeg.decode_jpeg(r["jpg"]).astype(np.float64) - src).mean() < 12.0
    plain = write_shards(root, "train", tmp_path / "plain", shard_size=4, workers=1, progress=False)
    assert plain["reencode"] is False
    assert sum(simplejpeg.decode_jpeg_header(r["jpg"])[3] == "444" for r in _samples(tmp_path / "plain")) == 6
