"""The ablation sweep's cells, its FLOPs-equal steps and its cache (a fake runner: no training),
and one real end-to-end run of two cells at a handful of steps (slow)."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from benchmarks import ablate

# a fake FLOP model: MAE 1.0 per image; AMT 0.5 after a warm-up at 1.0 over 25% of the run; SimMIM 4.0
FAKE = {v: (1.0, 1.0, 0.0) for v in ablate.VARIANTS}
FAKE.update({v: (1.0, 0.5, 0.25) for v in ("amt_box", "amt_released", "amt_minmax_then_mean", "amt_uniform")})
FAKE.update(simmim=(4.0, 4.0, 0.0), amt_simmim=(4.0, 2.0, 0.25))


def _cells(steps: int = 100) -> list[ablate.Cell]:
    return ablate.plan_cells(steps, 32, 4, lambda v, i, p: FAKE[v])


def test_every_variant_at_equal_steps_two_seeds_for_mae_and_amt_and_flops_twins_only_where_steps_differ():
    cells = _cells()
    names = [c.name for c in cells]
    assert names[:2] == ["mae-steps-s0", "amt_box-steps-s0"]  # the first cells a short session runs
    assert len(names) == len(set(names))
    assert {c.variant for c in cells if c.compare == "steps"} == set(ablate.VARIANTS)
    assert sorted(c.seed for c in cells if c.variant == "mae") == [0, 1]
    assert sorted((c.compare, c.seed) for c in cells if c.variant == "amt_box") == [("flops", 0), ("flops", 1), ("steps", 0), ("steps", 1)]
    # MAE and AutoMAE cost MAE's FLOPs per step: their FLOPs-equal run is the steps-equal one
    assert not [c for c in cells if c.compare == "flops" and c.variant in ("mae", "automae_online", "automae_stored")]
    assert all(c.steps == 100 for c in cells if c.compare == "steps")


def test_flops_equal_steps_bill_amt_its_warm_up_at_the_base_cost():
    steps = {c.variant: c.steps for c in _cells(100) if c.compare == "flops" and c.seed == 0}
    # 100 MAE steps = 100 FLOP units; AMT: 0.25 x 1.0 + 0.75 x 0.5 = 0.625 per step -> 160 steps
    assert steps["amt_box"] == steps["amt_uniform"] == 160
    assert steps["simmim"] == 25  # 100 / 4.0
    assert steps["amt_simmim"] == round(100 / (0.25 * 4.0 + 0.75 * 2.0))  # 40
    assert ablate.flops_equal_steps(10.0, 1.0, 1.0, 0.0) == 10


def test_the_real_flop_model_puts_amt_near_0_6_of_mae_after_its_warm_up():
    mae_warm, mae_main, mae_share = ablate.flops_model("mae", 32, 4)
    warm, main, share = ablate.flops_model("amt_box", 32, 4)
    assert (mae_warm, mae_share, share) == (mae_main, 0.0, 0.25) and warm == mae_warm  # random 0.75 masking until the refresh
    assert 0.5 < main / mae_main < 0.7  # 15% of patches in the encoder instead of 25%, 60% in the decoder instead of 100%
    s_warm, s_main, _ = ablate.flops_model("amt_simmim", 32, 4)
    assert s_main < s_warm == ablate.flops_model("simmim", 32, 4)[0]  # thrown units leave SimMIM's encoder


def _args(tmp_path, *extra):
    args = ablate.parse_args(["--data", str(tmp_path), *extra])
    args.cell_flops = {}
    return args


def test_cache_skips_finished_cells_resumes_after_an_interruption_and_reruns_a_stale_one(tmp_path):
    cells = [c for c in _cells(100) if c.variant in ("mae", "simmim")]
    args = _args(tmp_path)
    ran: list[str] = []

    def runner(cell):
        ran.append(cell.name)
        if len(ran) == 3:
            raise KeyboardInterrupt  # the session ends during the third cell
        return {"probe_top1": 0.4, "knn_top1": 0.3, "cka_at_0.5": 0.9, "pretrain_wall_s": 10.0, "seed": cell.seed}

    with pytest.raises(KeyboardInterrupt):
        ablate.sweep(cells, args, tmp_path / "res", runner)
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == sorted(f"{c.name}.json" for c in cells[:2])
    saved = json.loads((tmp_path / "res" / f"{cells[0].name}.json").read_text())
    assert saved["steps"] == 100 and saved["seed"] == 0 and saved["config"]["sets"] == cells[0].sets()
    assert {"machine", "finished", "metrics"} <= saved.keys()

    ran.clear()
    done = ablate.sweep(cells, args, tmp_path / "res", lambda c: runner(c) if len(ran) < 2 else pytest.fail("ran twice"))
    assert ran == [c.name for c in cells[2:]]  # the two finished cells were skipped
    assert set(done) == {c.name for c in cells}

    # a result made with another learning rate is stale: that cell runs again
    ran.clear()
    other = _args(tmp_path, "--base-lr", "1e-3")
    ablate.sweep(cells[:1], other, tmp_path / "res", lambda c: {**runner(c)})
    assert ran == [cells[0].name]


def test_stop_time_starts_no_new_cell_and_the_table_shows_the_seed_spread(tmp_path):
    cells = [c for c in _cells(100) if c.variant == "mae"]
    args = _args(tmp_path)
    done = ablate.sweep(cells, args, tmp_path / "res", lambda c: pytest.fail("started after the stop time"), stop_at=0.0)
    assert done == {}
    vals = iter([0.40, 0.44])
    ablate.sweep(cells, args, tmp_path / "res", lambda c: {"probe_top1": next(vals), "knn_top1": 0.3, "cka_at_0.5": 0.9,
                                                           "pretrain_wall_s": 10.0})
    done = {c.name: json.loads((tmp_path / "res" / f"{c.name}.json").read_text()) for c in cells}
    row = [r for r in ablate.table(cells, done).splitlines() if r.startswith("| mae ")]
    assert row == ["| mae | steps | 100 | 2/2 | 42.0 (40.0 / 44.0) | 30.0 (30.0 / 30.0) | 0.900 | 10 |"]


def test_bad_options_are_refused_by_name(tmp_path, capsys):
    for argv, needle in ((["--variants", "mae,byol"], "--variants"), (["--steps", "0"], "--steps"),
                         (["--compare", "time"], "--compare"), (["--budget", "3"], "--calib-step-s"), (["--seeds", "a"], "--seeds")):
        with pytest.raises(SystemExit):
            ablate.parse_args(["--data", str(tmp_path), *argv])
        assert needle in capsys.readouterr().err


def test_budget_arithmetic():
    # 1 h, 2 cells of 60 s evaluation each, costs 1 + 0.5 MAE steps per budget step at 2 s: (3600 - 120) / 3
    assert ablate.steps_for_budget(1.0, [1.0, 0.5], 2.0, 60.0) == 1160
    with pytest.raises(ValueError, match="evaluations alone"):
        ablate.steps_for_budget(0.01, [1.0] * 3, 1.0, 60.0)


@pytest.mark.slow
def test_two_cells_really_pretrain_probe_and_cache(tmp_path, capsys):
    src = tmp_path / "imgs"
    for split, n in (("train", 12), ("test", 4)):
        for ci, c in enumerate(("a", "b")):
            d = src / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), (ci * 200, i * 20, 50)).save(d / f"{i}.jpg")
    argv = ["--data", str(src), "--steps", "3", "--variants", "mae,amt_box", "--compare", "steps", "--seeds", "0",
            "--results", str(tmp_path / "res"), "--out", str(tmp_path / "work"), "--json"]
    old = dict(ablate.MODE)
    ablate.MODE.update(pretrain_images=16, probe_train=16, probe_val=8, cka_images=4, batch=4)
    try:
        assert ablate.main(argv) == 0
        files = sorted(p.name for p in (tmp_path / "res" / "steps3").iterdir())
        assert files == ["amt_box-steps-s0.json", "mae-steps-s0.json"]
        r = json.loads((tmp_path / "res" / "steps3" / "mae-steps-s0.json").read_text())
        assert 0.0 <= r["metrics"]["probe_top1"] <= 1.0 and r["steps"] == 3
        stamp = [p.stat().st_mtime_ns for p in (tmp_path / "res" / "steps3").iterdir()]
        assert ablate.main(argv) == 0  # everything cached: nothing runs again
        assert [p.stat().st_mtime_ns for p in (tmp_path / "res" / "steps3").iterdir()] == stamp
        capsys.readouterr()
        assert ablate.main(argv + ["--table-only"]) == 0
        assert "| mae | steps | 3 | 1/1 |" in capsys.readouterr().out
    finally:
        ablate.MODE.clear()
        ablate.MODE.update(old)
