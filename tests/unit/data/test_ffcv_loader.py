"""FFCV loader: crop box/flip vs pixels, index/label pairing, train order and resume, eval coverage,
determinism across thread counts, buffer reuse. Small .beton files are written here."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("ffcv")
from ffcv.fields import IntField, RGBImageField  # noqa: E402
from ffcv.writer import DatasetWriter  # noqa: E402

from mimscale.data.ffcv_loader import build_ffcv_loader  # noqa: E402
from mimscale.data.sampler import ShardedBatchSampler  # noqa: E402

S = 32
SIZES = [(320, 240), (240, 320), (97, 61), (40, 30), (640, 480), (500, 333)]  # (W, H) of position i % 6
N = 23
KEYS = {"image", "box", "flip", "index", "label", "skipped", "converted"}


def _gradient(width: int, height: int, blue: int) -> np.ndarray:
    """R encodes x, G encodes y (0..255 across the image), B the sample."""
    a = np.empty((height, width, 3), np.uint8)
    a[..., 0] = np.round(np.arange(width) * 255.0 / (width - 1))[None, :]
    a[..., 1] = np.round(np.arange(height) * 255.0 / (height - 1))[:, None]
    a[..., 2] = blue
    return a


def _waves(width: int, height: int, period: int = 48) -> np.ndarray:
    """Sinusoids along x (R) and y (G): a misregistration of a few pixels shows."""
    a = np.full((height, width, 3), 128, np.uint8)
    a[..., 0] = np.round(127.5 + 127 * np.sin(2 * np.pi * np.arange(width) / period))[None, :]
    a[..., 1] = np.round(127.5 + 127 * np.sin(2 * np.pi * np.arange(height) / period))[:, None]
    return a


def _blue(pos: int) -> int:
    return 10 * pos + 5


def _label(pos: int) -> int:
    return (7 * pos) % 5


def _index(pos: int) -> int:
    return pos + (pos >= 7)  # the writer dropped a bad file 7: global index != position after it


class _Gradients:
    def __len__(self):
        return N

    def __getitem__(self, pos):
        return _gradient(*SIZES[pos % len(SIZES)], _blue(pos)), _label(pos), _index(pos)


class _Waves:
    sizes = [(1024, 768), (1025, 769), (500, 375), (500, 333)]

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, pos):
        return _waves(*self.sizes[pos]), 0, pos


def _write(path, dataset, mode: str = "jpg") -> str:
    fields = {"image": RGBImageField(write_mode=mode, jpeg_quality=95), "label": IntField(), "index": IntField()}
    DatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(dataset)
    return str(path)


@pytest.fixture(scope="module")
def grad_beton(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("ffcv") / "grad.beton", _Gradients())


@pytest.fixture(scope="module")
def waves_beton(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("ffcv") / "waves.beton", _Waves())


def _take(loader, n: int) -> list[dict]:
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def _hwc(image: torch.Tensor, flip: bool) -> np.ndarray:
    """One [3, S, S] output as [S, S, 3] float, un-mirrored when it was flipped."""
    a = image.permute(1, 2, 0).numpy().astype(np.float64)
    return a[:, ::-1] if flip else a


def _expected_gradient(box, width: int, height: int) -> np.ndarray:
    """R, G a crop of _gradient at ``box`` shows: output pixel j samples x0 + (j + 0.5) * w / S."""
    j = np.arange(S) + 0.5
    xs = box[0] * width + j * (box[2] - box[0]) * width / S - 0.5
    ys = box[1] * height + j * (box[3] - box[1]) * height / S - 0.5
    r = np.clip(xs, 0, width - 1) * 255.0 / (width - 1)
    g = np.clip(ys, 0, height - 1) * 255.0 / (height - 1)
    return np.stack([np.broadcast_to(r[None, :], (S, S)), np.broadcast_to(g[:, None], (S, S))], -1)


def _check_contract(batch: dict, b: int) -> None:
    assert set(batch) == KEYS
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (b, 3, S, S)
    box = batch["box"]
    assert box.dtype == torch.float32 and box.shape == (b, 4)
    assert torch.all((box >= 0) & (box <= 1)) and torch.all(box[:, :2] < box[:, 2:])
    for k in ("flip", "index", "label"):
        assert batch[k].shape == (b,)
    assert batch["flip"].dtype == torch.bool
    assert batch["index"].dtype == torch.int64 and batch["label"].dtype == torch.int64
    assert batch["skipped"].shape == () and batch["skipped"].item() == 0 and batch["converted"].item() == 0


@pytest.fixture(scope="module")
def stream(grad_beton):
    """Rank 0 of 2, B=4, 2 workers: the first 9 batches (11 samples per rank: 2 batches per epoch)
    and their decode scales."""
    loader = build_ffcv_loader(grad_beton, S, 4, 0, 2, seed=3, num_workers=2)
    it = iter(loader)
    batches, scales = [], []
    for _ in range(9):
        batches.append(next(it))
        scales.append(loader.last_decode_scale)
    it.close()
    return loader, batches, scales


# ----------------------------------------------------------------------------------------------
# pixels: the reported box and flip are what was applied


def test_box_and_flip_match_pixels_full_and_reduced_decode(stream):
    loader, batches, scales = stream
    positions = {_index(p): p for p in range(N)}
    errs = {"reduced": [], "full": []}
    flips = 0
    for batch, m in zip(batches, scales):
        _check_contract(batch, 4)
        for k in range(4):
            pos = positions[batch["index"][k].item()]
            w, h = SIZES[pos % len(SIZES)]
            got = _hwc(batch["image"][k], batch["flip"][k].item())
            exp = _expected_gradient(batch["box"][k].tolist(), w, h)
            err = np.abs(got[..., :2] - exp)
            for i, j in [(0, 0), (0, S - 1), (S - 1, 0), (S - 1, S - 1), (S // 2, S // 2)]:
                assert err[i, j].max() <= 8.0, (pos, batch["box"][k], (i, j), got[i, j], exp[i, j])
            assert err.mean() <= 2.0, (pos, batch["box"][k], err.mean())
            errs["full" if m[k] == 8 else "reduced"].append(err.mean())
            flips += batch["flip"][k].item()
    assert len(errs["full"]) > 0 and len(errs["reduced"]) > 0, "both decode paths must be exercised"
    scales = torch.cat(scales)
    assert (scales < 8).any() and (scales == 8).any()
    assert set(scales.tolist()) <= {1, 2, 4, 8}
    assert 0 < flips < 36


def test_raw_images_crop_like_jpegs(tmp_path):
    """write_mode='raw' samples skip the JPEG decode (scale 8/8) and get the same crop treatment."""
    raw = build_ffcv_loader(_write(tmp_path / "raw.beton", _Gradients(), mode="raw"), S, 4, 0, 1, seed=0, num_workers=2, mode="eval")
    flips = 0
    for batch in raw:
        assert (raw.last_decode_scale == 8).all()
        for k, i in enumerate(batch["index"].tolist()):
            pos = i - (i > 7)
            got = _hwc(batch["image"][k], batch["flip"][k].item())
            assert np.abs(got[..., :2] - _expected_gradient(batch["box"][k].tolist(), *SIZES[pos % len(SIZES)])).mean() < 1.0
            assert np.all(got[..., 2] == _blue(pos))
            flips += batch["flip"][k].item()
    assert 0 < flips < N


def test_reduced_decode_registers_detail(waves_beton):
    """Compare each crop with PIL's area (BOX) resample of the original array at the reported box,
    and at the box moved 2 pixels along x: the waves (period 48) show any misregistration."""
    size = 64
    loader = build_ffcv_loader(waves_beton, size, 4, 0, 1, seed=0, num_workers=2)
    arrays = [_waves(*wh) for wh in _Waves.sizes]

    def diff(got, img, box, dx):
        x0, y0, x1, y1 = box
        if x0 + dx < 0 or x1 + dx > img.size[0]:
            return np.inf
        ref = np.asarray(img.resize((size, size), Image.BOX, box=(x0 + dx, y0, x1 + dx, y1)), np.float64)
        return np.abs(got - ref[..., 0]).mean()

    it = iter(loader)
    aligned, seen = [], set()
    for _ in range(6):  # one batch per epoch: all 4 images, new crops each epoch
        batch = next(it)
        seen.update(loader.last_decode_scale.tolist())
        for k in range(4):
            img = Image.fromarray(arrays[batch["index"][k].item()])
            wid, hgt = img.size
            got = _hwc(batch["image"][k], batch["flip"][k].item())[..., 0]  # R: the x wave
            box = np.minimum(np.array(batch["box"][k].tolist(), np.float64) * [wid, hgt, wid, hgt], [wid, hgt, wid, hgt])
            d = diff(got, img, box, 0)
            # 2-8 aligned (a 1/8-scale IDCT decode blurs this fine wave a little more than an area
            # filter does); a 1-pixel shift already gives ~10, 2 pixels ~20
            assert d < min(diff(got, img, box, -2), diff(got, img, box, 2)) - 5, (box, d)
            aligned.append(d)
    it.close()
    assert any(m < 8 for m in seen) and len(seen) >= 2, seen
    assert max(aligned) < 8.5, np.round(aligned, 2)


def test_crop_geometry_follows_scale_and_ratio(stream):
    _, batches, _ = stream
    box = torch.cat([b["box"] for b in batches]).double()
    idx = torch.cat([b["index"] for b in batches]).tolist()
    inv = {_index(p): p for p in range(N)}
    wh = torch.tensor([SIZES[inv[i] % len(SIZES)] for i in idx], dtype=torch.float64)
    w = (box[:, 2] - box[:, 0]) * wh[:, 0]
    h = (box[:, 3] - box[:, 1]) * wh[:, 1]
    area = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])
    # rounding to whole (possibly 1/8-scale) pixels moves small crops of small images a little
    assert area.min() > 0.12 and area.max() <= 1.0
    assert (w / h).min() > 0.55 and (w / h).max() < 1.8
    assert area.std() > 0.1  # random sizes, not a fixed crop


# ----------------------------------------------------------------------------------------------
# pairing, order, resume, eval, threads, buffers


def test_index_and_label_travel_with_their_image(stream):
    _, batches, _ = stream
    inv = {_index(p): p for p in range(N)}
    for batch in batches:
        for k in range(4):
            pos = inv[batch["index"][k].item()]
            assert batch["label"][k].item() == _label(pos)
            blue = batch["image"][k, 2].double().mean().item()
            assert abs(blue - _blue(pos)) < 3, (pos, blue)


def test_train_order_is_the_sharded_samplers(stream, grad_beton):
    loader0, batches0, _ = stream
    loader1 = build_ffcv_loader(grad_beton, S, 4, 1, 2, seed=3, num_workers=2)
    batches1 = _take(loader1, 9)
    assert loader0.batches_per_epoch == loader1.batches_per_epoch == 2 and len(loader0) == 2  # 11 per rank // 4
    assert loader0.num_samples == N
    for rank, batches in ((0, batches0), (1, batches1)):
        ref = ShardedBatchSampler(N, 4, rank, 2, seed=3)
        it = iter(ref)
        for batch in batches:
            assert batch["index"].tolist() == [_index(i) for _, i in next(it)]
    # the two ranks never share a sample within an epoch
    for e in range(4):
        a = {i for b in batches0[2 * e: 2 * e + 2] for i in b["index"].tolist()}
        b = {i for b in batches1[2 * e: 2 * e + 2] for i in b["index"].tolist()}
        assert not a & b


@pytest.mark.parametrize("start", [3, 4])  # mid-epoch (epoch 1, batch 1), and an epoch boundary
def test_resume_repeats_the_uninterrupted_stream(stream, grad_beton, start):
    _, batches, _ = stream
    resumed = _take(build_ffcv_loader(grad_beton, S, 4, 0, 2, seed=3, start_micro_batch=start, num_workers=2), 9 - start)
    for a, b in zip(batches[start:], resumed):
        for k in KEYS:
            assert torch.equal(a[k], b[k]), k


def test_one_worker_gives_the_same_batches(stream, grad_beton):
    _, batches, _ = stream
    single = _take(build_ffcv_loader(grad_beton, S, 4, 0, 2, seed=3, num_workers=1), 5)
    for a, b in zip(batches, single):
        for k in KEYS:
            assert torch.equal(a[k], b[k]), k


def test_crops_change_with_seed_and_epoch(stream, grad_beton):
    _, batches, _ = stream
    first = {i: box for b in batches[:2] for i, box in zip(b["index"].tolist(), b["box"])}  # epoch 0
    later = [(i, box) for b in batches[2:4] for i, box in zip(b["index"].tolist(), b["box"])]  # epoch 1
    common = [(first[i], box) for i, box in later if i in first]
    assert common and all(not torch.equal(a, b) for a, b in common)
    other = _take(build_ffcv_loader(grad_beton, S, 4, 0, 2, seed=4, num_workers=2), 2)
    assert [b["index"].tolist() for b in other] != [b["index"].tolist() for b in batches[:2]]
    common = [(first[i], box) for b in other for i, box in zip(b["index"].tolist(), b["box"]) if i in first]
    assert common and all(not torch.equal(a, b) for a, b in common)


@pytest.fixture(scope="module")
def eval_ranks(grad_beton):
    """(loader, batches, batches of a second iteration) of eval ranks 0 and 1 of 2 (B=4, seed 0)."""
    out = []
    for rank in range(2):
        loader = build_ffcv_loader(grad_beton, S, 4, rank, 2, seed=0, num_workers=2, mode="eval")
        out.append((loader, list(loader), list(loader)))
    return out


def test_eval_covers_every_sample_once(eval_ranks):
    seen, sizes = [], []
    for loader, batches, again in eval_ranks:
        assert len(batches) == loader.batches_per_epoch == 3
        for a, b in zip(batches, again):  # every iteration is one pass, the same pass
            for k in KEYS:
                assert torch.equal(a[k], b[k]), k
        seen += [i for b in batches for i in b["index"].tolist()]
        sizes.append(sum(len(b["index"]) for b in batches))
    assert sorted(seen) == sorted(_index(p) for p in range(N))
    assert sorted(sizes) == [11, 12]


def test_crops_follow_the_global_index_not_the_file_position(eval_ranks, tmp_path):
    """The same samples written in reverse order (as a rewrite that drops other files would move
    them) get the same crops: the randomness is keyed by the index field."""

    class Reversed(_Gradients):
        def __getitem__(self, pos):
            return super().__getitem__(N - 1 - pos)

    rev = build_ffcv_loader(_write(tmp_path / "rev.beton", Reversed()), S, 4, 0, 1, seed=0, num_workers=2, mode="eval")
    got = {i: (b, k) for b in rev for k, i in enumerate(b["index"].tolist())}
    assert sorted(got) == sorted(_index(p) for p in range(N))
    for _, batches, _ in eval_ranks:
        for a in batches:
            for k, i in enumerate(a["index"].tolist()):
                b, j = got[i]
                assert torch.equal(a["box"][k], b["box"][j]) and a["flip"][k] == b["flip"][j]
                assert torch.equal(a["image"][k], b["image"][j]) and a["label"][k] == b["label"][j]


def test_handed_out_images_survive_later_batches(grad_beton):
    loader = build_ffcv_loader(grad_beton, S, 2, 0, 1, seed=1, num_workers=1, batches_ahead=1)
    it = iter(loader)
    first = next(it)
    kept = first["image"].clone()
    for _ in range(6):  # FFCV cycles batches_ahead + 2 = 3 output buffers
        next(it)
    it.close()
    assert torch.equal(first["image"], kept)


def test_one_iteration_at_a_time(eval_ranks):
    loader = eval_ranks[0][0]
    first = iter(loader)
    next(first)
    with pytest.raises(RuntimeError, match="another iteration"):
        next(iter(loader))
    first.close()
    assert next(iter(loader))["index"].tolist() == eval_ranks[0][1][0]["index"].tolist()


def test_undecodable_jpeg_raises(grad_beton, tmp_path):
    from ffcv.reader import Reader

    broken = tmp_path / "broken.beton"
    broken.write_bytes(open(grad_beton, "rb").read())
    ptr = int(Reader(str(broken)).metadata["f0"]["data_ptr"][5])
    with open(broken, "r+b") as f:  # sample 5's JPEG loses its start-of-image marker
        f.seek(ptr)
        f.write(b"\0\0")
    with pytest.raises(RuntimeError, match=rf"index \[{_index(5)}\]"):
        list(build_ffcv_loader(str(broken), S, 4, 0, 1, seed=0, num_workers=2, mode="eval"))


def test_starting_the_loader_leaves_the_global_rng_alone(grad_beton):
    # masking draws from the global torch RNG, which a resumed run restores before the loader starts
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    _take(build_ffcv_loader(grad_beton, S, 4, 0, 1, seed=0, num_workers=1), 1)
    assert torch.equal(torch.rand(3), expected)


def test_whole_image_pass_covers_each_sample_once_uncropped(grad_beton):
    """scale=None (AMT's attention refresh): every sample once across 2 ranks, the whole image
    (up to a reduced decode's part-padding last pixel), never flipped."""
    seen = []
    for rank in range(2):
        for b in build_ffcv_loader(grad_beton, S, 4, rank, 2, seed=0, num_workers=1, mode="eval", scale=None, hflip=1.0):
            assert not b["flip"].any()
            assert torch.all(b["box"][:, :2] == 0) and torch.all(b["box"][:, 2:] > 0.97)
            seen += b["index"].tolist()
    assert sorted(seen) == sorted(_index(p) for p in range(N))


def test_crop_resize_follows_the_other_sources_rule(tmp_path):
    """FFCV crops are resized as crop.py resizes every other source's (bicubic up to 1.5x shrink,
    area beyond; mimscale/data/_cv_resize.cpp), not with FFCV's area filter at every scale. Raw
    pixels: no decode between the stored image and the resize."""
    from mimscale.data import crop as crop_mod
    from mimscale.data import ffcv_decode

    class Fine(_Waves):  # detail near the output's Nyquist rate: the two filters differ visibly
        def __getitem__(self, pos):
            return _waves(*self.sizes[pos], period=5), 0, pos

    assert ffcv_decode._cv_resize is not None, "mimscale/data/_cv_resize was not built (setup.py, needs the system OpenCV)"
    loader = build_ffcv_loader(_write(tmp_path / "raw.beton", Fine(), mode="raw"), 224, 2, 0, 1, seed=3, num_workers=1,
                               mode="train")
    near_cubic = shrinks = 0
    for batch in _take(loader, 6):
        for k, i in enumerate(batch["index"].tolist()):
            src = _waves(*_Waves.sizes[i], period=5)
            h, w = src.shape[:2]
            x0, y0, x1, y1 = (round(v * d) for v, d in zip(batch["box"][k].tolist(), (w, h, w, h)))
            flip = batch["flip"][k].item()
            want = crop_mod._resize(src[y0:y1, x0:x1], 224, flip).astype(int)
            got = batch["image"][k].permute(1, 2, 0).numpy().astype(int)
            diff = np.abs(got - want)
            assert diff.max() <= 2 and diff.mean() < 0.05, (i, (x0, y0, x1, y1), diff.max(), diff.mean())  # two OpenCV builds
            shrink = min(x1 - x0, y1 - y0) / 224
            if 1.0 < shrink <= 1.5:  # where FFCV's own filter (area) would differ
                shrinks += 1
                area = crop_mod.cv2.resize(src[y0:y1, x0:x1], (224, 224), interpolation=crop_mod.cv2.INTER_AREA).astype(int)
                area = area[:, ::-1] if flip else area
                near_cubic += np.abs(got - area).mean() > 5 * diff.mean() + 0.5
    assert shrinks > 0 and near_cubic == shrinks
