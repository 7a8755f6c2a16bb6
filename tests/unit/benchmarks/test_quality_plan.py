"""The quality benchmark's equal-compute arithmetic and data subsets (no pretraining run)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from benchmarks import quality
from benchmarks.quality_data import prepare


def _fake_calibration(monkeypatch, step_s: float, refresh_s: float):
    def fake_pretrain(args, method, data, steps, out, extra, timeout):
        out.mkdir(parents=True, exist_ok=True)
        rows = [{"step": i + 1, "step_s": step_s} for i in range(steps)]
        (out / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        return {"amt_refreshes": [{"seconds": refresh_s}]} if method in quality.AMT_BASE else {}

    monkeypatch.setattr(quality, "pretrain", fake_pretrain)


def test_budget_bills_amt_its_refresh_and_its_random_masking_phase(monkeypatch, tmp_path):
    args, mode = quality.parse_args(["--data", str(tmp_path), "--budget", "2"])
    _fake_calibration(monkeypatch, step_s=1.0, refresh_s=0.0)
    steps, _ = quality.plan_steps(args, "mae", {}, mode, tmp_path / "mae")
    assert steps == 120  # 2 minutes at 1 s per step
    _fake_calibration(monkeypatch, step_s=0.5, refresh_s=30.0)
    steps, calib = quality.plan_steps(args, "amt", {}, mode, tmp_path / "amt")
    # 25% of the steps at MAE's 1 s, 75% at AMT's 0.5 s, plus one 30 s refresh: 120 s in all
    assert steps == int((120 - 30) / (0.25 * 1.0 + 0.75 * 0.5)) and calib["calib_refresh_s"] == 30.0
    # AMT on SimMIM: its random-masking phase runs at SimMIM's calibrated step time, not MAE's
    _fake_calibration(monkeypatch, step_s=2.0, refresh_s=0.0)
    quality.plan_steps(args, "simmim", {}, mode, tmp_path / "simmim")
    _fake_calibration(monkeypatch, step_s=1.0, refresh_s=20.0)
    steps, _ = quality.plan_steps(args, "amt_simmim", {}, mode, tmp_path / "amt_simmim")
    assert steps == int((120 - 20) / (0.25 * 2.0 + 0.75 * 1.0))


def test_bad_methods_and_sizes_are_refused_by_name(tmp_path, capsys):
    for argv, needle in ((["--methods", "mae,byol"], "--methods"), (["--budget", "0"], "--budget")):
        with pytest.raises(SystemExit):
            quality.parse_args(["--data", str(tmp_path), *argv])
        assert needle in capsys.readouterr().err


def test_subsets_are_balanced_symlinks_and_the_model_follows_the_image_size(tmp_path):
    for split, n in (("train", 6), ("test", 3)):
        for c in ("cat", "dog"):
            d = tmp_path / "src" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (48, 40), (i * 20, 0, 0)).save(d / f"{i}.jpg")
    mode = {"pretrain_images": 4, "probe_train": 8, "probe_val": 100}
    data = prepare(tmp_path / "src", tmp_path / "out", mode, None, None, seed=0)
    assert data["counts"] == {"pretrain": 4, "probe_train": 8, "probe_val": 6, "classes": 2}
    assert (data["img_size"], data["patch_size"]) == (32, 4)  # short side 40 -> 32 px, an 8 x 8 grid
    files = list(Path(data["pretrain"]).rglob("*.jpg"))
    assert len(files) == 4 and all(f.is_symlink() for f in files)
    assert sorted(p.name for p in Path(data["probe"]).iterdir()) == ["train", "val"]  # test/ serves as val


def test_fixed_steps_and_ablation_variants(tmp_path, capsys):
    """--steps gives every method the same steps (no budget, no calibration); a variant such as
    automae_stretched runs only when named, with one setting changed."""
    args, mode = quality.parse_args(["--data", str(tmp_path), "--quick", "--steps", "200", "--methods", "automae,automae_stretched"])
    assert (mode["quick_steps"], mode["calib_steps"], args.budget) == (200, 0, None)
    assert "automae_stretched" not in quality.METHODS
    assert quality.METHOD_SETS["automae_stretched"] == quality.METHOD_SETS["automae"] + ["masking.automae.attention=stretched"]
    with pytest.raises(SystemExit):
        quality.parse_args(["--data", str(tmp_path), "--steps", "0"])
    assert "--steps must be > 0" in capsys.readouterr().err
