"""The benchmark CLI runs end to end and prints one JSON object with the documented fields
(numbers are printed, never asserted against a target)."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from mimscale.bench import cli as bench
from tests.integration.launch import REPO, env
from tests.unit.bench.test_bench_gpu import node_blocked_modules

QUICK = REPO / "benchmarks" / "gpu_quick.sh"
# benchmarks/gpu_quick.sh's rows, as benchmarks.gpu names them (--tiny: ViT-Tiny for ViT-B, ViT-Small for L and H)
QUICK_ROWS = ["mae vit_base zero1 eager synthetic", "mae vit_large zero1 eager synthetic", "amt vit_base zero1 eager synthetic",
              "automae-frozen vit_base zero1 eager synthetic", "mae vit_huge zero2 eager synthetic micro128", "mae vit_base zero1 eager wds",
              "mae vit_base zero1 eager wds decode nvjpeg", "loader wds decode cpu", "loader wds decode nvjpeg"]

TINY = ["--model", "vit_tiny", "--batch", "2", "--steps", "1", "--warmup", "1", "--threads", "1",
        "--set", "model.img_size=32", "--set", "model.patch_size=8", "--set", "model.decoder_depth=1",
        "--set", "model.decoder_dim=32", "--set", "model.decoder_heads=2", "--set", "data.synthetic_size=40"]


def bench_step(*args: str) -> dict:
    """Run ``python -m mimscale.bench step <args> --json`` on the tiny model; its JSON result."""
    r = subprocess.run([sys.executable, "-m", "mimscale.bench", "step", *args, *TINY, "--json"],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# make test-all; make test runs the same CLI and checks the same fields through the AMT case below
@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--no-deepspeed"]], ids=["deepspeed", "torch"])
def test_bench_step_prints_json(extra):
    d = bench_step("--method", "mae", *extra)
    for key in ("img_per_s", "step_s", "gflop_per_img", "peak_gflops", "mfu", "fwd_bwd_s", "optimizer_s"):
        assert isinstance(d[key], float) and d[key] > 0, key
    assert d["batch"] == 2 and d["precision"] == "fp32"
    assert abs(d["img_per_s"] - 2 / d["step_s"]) < 1e-6


@pytest.mark.parametrize("extra", [[], pytest.param(["--no-deepspeed"], marks=pytest.mark.slow)], ids=["deepspeed", "torch"])
def test_bench_step_amt_masks_and_throws(extra):
    """--method amt times steps after a refresh: the plan throws, and FLOPs fall with it."""
    d = bench_step("--method", "amt", *extra)
    assert d["method"] == "amt" and d["step_s"] > 0
    for key in ("img_per_s", "step_s", "gflop_per_img", "peak_gflops", "mfu", "fwd_bwd_s", "optimizer_s"):
        assert isinstance(d[key], float) and d[key] > 0, key
    assert d["batch"] == 2 and d["precision"] == "fp32" and abs(d["img_per_s"] - 2 / d["step_s"]) < 1e-6
    from mimscale.methods.mae import mim_flops_per_image

    tiny = dict(enc_dim=192, enc_depth=12, img_size=32, patch=8, dec_dim=32, dec_depth=1)
    assert d["gflop_per_img"] * 1e9 == pytest.approx(mim_flops_per_image(visible=3, masked=7, **tiny))  # L=16: 3 / 7 / 6
    if not extra:
        assert d["plan"] == {"visible": 3, "masked": 7, "thrown": 6}
        assert d["refresh_s_per_img"] > 0 and d["refresh_pct_of_epoch"] > 0
        # the preset's schedule (400 epochs, refreshes from epoch 40 every 40: 9) applied to the measured refresh
        assert (d["run_epochs"], d["run_refreshes"]) == (400, 9)
        assert d["refresh_pct_of_run"] == pytest.approx(d["refresh_pct_of_epoch"] * 9 / 400)


@pytest.mark.slow  # make test-all; the frozen extractor's loading is tests/unit/masking/test_automae.py's and test_weights.py's
@pytest.mark.parametrize("extractor", ["frozen"])  # stored, online, ema: tests/unit/masking/test_automae.py
def test_bench_step_automae_extractors(extractor):
    d = bench_step("--method", "automae", "--extractor", extractor)
    assert d["method"] == "automae" and d["extractor"] == extractor and d["step_s"] > 0
    assert d["plan"] == {"visible": 4, "masked": 12, "thrown": 0}


def bench_gpu(*args: str) -> tuple[dict, str]:
    """``python -m benchmarks.gpu --tiny <args>`` (the CPU plumbing run): its JSON and its table."""
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--tiny", "--steps", "1", "--warmup", "1", *args],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    return json.loads(lines[-1]), "\n".join(lines[:-1])


def test_bench_gpu_plumbing_on_cpu():
    """One real case end to end, and a case without its data reported as a row (not a crash)."""
    d, table = bench_gpu("--methods", "mae", "--zero", "1", "--compile", "off", "--data", "synthetic,ffcv")
    assert d["bench"] == "gpu" and d["precision"] == "fp32" and d["gpus"] == 1
    run, skipped = d["cases"]
    assert (run["method"], run["zero"], run["compile"], run["data"], run["error"]) == ("mae", 1, False, "synthetic", None)
    assert run["img_per_s"] > 0 and 0 < run["mfu"] < 1 and run["data_wait_pct"] >= 0 and run["max_rss_gib"] > 0
    assert run["plan"] == {"visible": 4, "masked": 12, "thrown": 0}
    assert skipped["data"] == "ffcv" and "no --ffcv" in skipped["error"]
    assert "img/s/GPU" in table and "MFU %" in table and "skipped: no --ffcv" in table


@pytest.mark.slow  # make test-all: every method and ZeRO stage, compiled (aot_eager: graphs without codegen) and not
def test_bench_gpu_matrix_on_cpu():
    d, table = bench_gpu("--zero", "1,2", "--data", "synthetic", "--set", "train.compile_backend=aot_eager")
    assert len(d["cases"]) == 4 * 2 * 2
    for c in d["cases"]:
        assert c["error"] is None and c["img_per_s"] > 0, c
        assert (c["plan"]["thrown"] > 0) == (c["method"] == "amt"), c  # AMT masks and throws after its refresh
        assert (c["refresh_s_per_img"] is not None) == (c["method"] in ("amt", "automae-stored")), c
    assert table.count("\n") == 2 + len(d["cases"])  # header, rule, one row per case


def test_bench_gpu_grad_ckpt_and_checkpoint_save_on_cpu(tmp_path):
    """--grad-ckpt sets model.grad_ckpt on a step case; --ckpt-save adds one timed save (bench convert
    --no-convert) into a fresh folder under --save-dir, removed after; the markdown table has both rows."""
    d, table = bench_gpu("--methods", "mae", "--zero", "1", "--compile", "off", "--data", "synthetic", "--grad-ckpt", "1",
                         "--ckpt-save", "--save-dir", str(tmp_path / "saves"), "--md-out", str(tmp_path / "t.md"))
    step, save = d["cases"]
    assert (step["kind"], step["model"], step["micro_batch"], step["grad_ckpt"], step["error"]) == ("step", "vit_tiny", 2, 1, None)
    assert step["img_per_s"] > 0 and step["save_s"] is None
    assert (save["kind"], save["model"], save["zero"], save["error"]) == ("save", "vit_tiny", 1, None)
    assert save["save_s"] > 0 and 0 < save["checkpoint_gib"] < 1 and save["params"] > 5e6 and save["world_size"] == 1
    assert list((tmp_path / "saves").iterdir()) == []  # each save's folder is removed after it
    lines = table.splitlines()
    assert lines[1].split()[:2] == ["case", "method"] and lines[3].split()[:3] == ["step", "mae", "vit_tiny"]
    assert lines[4].split()[:3] == ["save", "mae", "vit_tiny"]
    md = (tmp_path / "t.md").read_text().splitlines()
    assert md[2].startswith("| case | method | model | micro | zero | grad_ckpt | compile | data |") and len(md) == 6


def node_env(tmp_path) -> dict:
    """env() for a process that imports as on the bare GPU check node: a sitecustomize on PYTHONPATH
    refuses every module whose distribution the node, after gpu_quick.sh's install, will not have
    (tests/unit/bench/test_bench_gpu.py: NODE_HAS and gpu_wheels.sh's wheels)."""
    site = tmp_path / "node_site"
    site.mkdir()
    # the path finder does not see them: importing raises ModuleNotFoundError, importlib.util.find_spec
    # says None (as torch's optional-module probes expect of a missing module)
    (site / "sitecustomize.py").write_text(
        '"""Imports as on the GPU check node: what it lacks is not found."""\nimport sys\nfrom importlib.machinery import PathFinder\n\n'
        f"BLOCKED = set({sorted(node_blocked_modules())!r})\n\n\n"
        "class NodePathFinder(PathFinder):\n"
        "    @classmethod\n"
        "    def find_spec(cls, name, path=None, target=None):\n"
        "        return None if name.partition('.')[0] in BLOCKED else PathFinder.find_spec(name, path, target)\n\n\n"
        "sys.meta_path[sys.meta_path.index(PathFinder)] = NodePathFinder\n")
    e = env()
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), e.get("PYTHONPATH")]))
    return e


def test_the_bench_path_imports_only_what_the_gpu_node_has(tmp_path):
    """What gpu_quick.sh runs imports with the node's packages and the wheels alone (mlflow and FFCV
    refused): the modules of bench step / convert, the Trainer, the loaders, data_prep.wds."""
    code = ("import importlib, sys\n"
            "for m in ('mimscale.bench.cli', 'mimscale.bench.step', 'mimscale.bench.convert', 'mimscale.trainer', 'mimscale.data.loader',\n"
            "          'mimscale.data.wds_loader', 'mimscale.data.streams', 'data_prep.wds', 'benchmarks.gpu', 'deepspeed.runtime.engine'):\n"
            "    importlib.import_module(m)\n"
            "try:\n    import mlflow\nexcept ModuleNotFoundError as e:\n    print('refused:', e)\n"
            "print(sorted(m for m in ('mlflow', 'ffcv', 'matplotlib', 'pandas') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=node_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout.strip().splitlines()
    assert out[-2] == "refused: No module named 'mlflow'" and out[-1] == "[]"


def test_gpu_quick_dry_run_plans_every_row(tmp_path):
    """gpu_quick.sh --dry-run prints its install, data and bench commands, and benchmarks.gpu --list
    parses its nine rows; nothing is written."""
    out, wheels = tmp_path / "out", tmp_path / "wheels"
    r = subprocess.run(["bash", str(QUICK), "--dry-run"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**env(), "PYTHON": sys.executable, "OUT": str(out), "WHEELS": str(wheels), "VENV": str(tmp_path / "venv"),
                            "WORK": str(tmp_path / "work")})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0] == f"+ {tmp_path}/venv/bin/python -m pip install --no-index --find-links {wheels} deepspeed webdataset simplejpeg tqdm"
    assert any("synthetic JPEGs" in ln and f"{tmp_path}/work/imagenet" in ln for ln in lines)
    assert f"-m data_prep.wds --src {tmp_path}/work/imagenet --split train --out {tmp_path}/work/shards" in r.stdout
    bench_line = next(ln for ln in lines if " -m benchmarks.gpu " in ln)
    assert bench_line.count("--case ") == 9 and f"--json-out {out}/gpu_quick.json --md-out {out}/gpu_quick.md" in bench_line
    listed = [ln.split(" ", 1)[1].rstrip(":") for ln in lines if ln[:1].isdigit()]
    assert listed == [*QUICK_ROWS[:4], QUICK_ROWS[4] + " (vs plan)", *QUICK_ROWS[5:]]
    commands = [ln.strip() for ln in lines if ln.startswith("    ")]
    assert all("--batch 128" in c and "--warmup 3 --data" in c for c in commands[:7]) and "--data-path " + str(tmp_path / "work/shards") in commands[5]
    assert commands[6].endswith("--decode nvjpeg")  # the step row with the GPU decoder
    shards = str(tmp_path / "work/shards")
    for c, decode in zip(commands[7:], ("cpu", "nvjpeg")):  # the loader rows: the same shards, workers and batch, each decoder
        assert f"-m mimscale.bench loader --source wds --path {shards} --decode {decode} --workers 12 --batch 128" in c
    assert not out.exists() and not (tmp_path / "work").exists()


@pytest.mark.slow  # make test-all (~2 min on 2 cores); make test runs its dry run and the bench path's imports above
def test_gpu_quick_plumbing_on_cpu(tmp_path):
    """QUICK_TINY=1 SKIP_INSTALL=1 bash benchmarks/gpu_quick.sh, importing as the node does: synthetic
    JPEGs, WebDataset shards, the nine rows at toy sizes; the JSON and the markdown table in OUT."""
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(QUICK)], cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={**node_env(tmp_path), "QUICK_TINY": "1", "SKIP_INSTALL": "1", "PYTHON": sys.executable, "OUT": str(out),
                            "WORK": str(tmp_path / "work")})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    d = json.loads((out / "gpu_quick.json").read_text())
    assert d["tiny"] and d["precision"] == "fp32" and len(d["cases"]) == 9
    tiny = {"vit_base": "vit_tiny", "vit_large": "vit_small", "vit_huge": "vit_small"}
    for case, row in zip(d["cases"], QUICK_ROWS[:6]):
        method, model, _, _, data = row.split()[:5]
        assert (case["method"], case["model"], case["data"], case["error"]) == (method, tiny[model], data, None), case
        assert case["img_per_s"] > 0 and 0 < case["mfu"] < 1 and case["max_rss_gib"] > 0, case
    vs_plan = d["cases"][4]["vs_plan"]
    assert d["cases"][4]["micro_batch"] == 4 and d["cases"][4]["zero"] == 2 and vs_plan["measured_gib"] > 0
    # the planner's row of ZeRO-2 without checkpointing, or a note saying why there is none (no mimscale/plan.py)
    assert vs_plan["note"] or (vs_plan["plan_gib"] > 0 and vs_plan["plan_row"]["zero_stage"] == 2), vs_plan
    assert d["cases"][5]["data_wait_pct"] > 0 and d["cases"][5]["h2d_s"] >= 0  # the wds loader's wait
    assert d["cases"][6]["decode"] == "nvjpeg" and d["cases"][6]["error"] is None and d["cases"][6]["data_wait_pct"] > 0
    for case, decode in zip(d["cases"][7:], ("cpu", "nvjpeg")):  # the loader rows: img/s and the cores they took
        assert (case["kind"], case["decode"], case["error"]) == ("loader", decode, None) and case["img_per_s"] > 0 and case["cores_used"] > 0
    assert (tmp_path / "work" / "shards" / "train-manifest.json").exists()
    md = (out / "gpu_quick.md").read_text().splitlines()
    assert md[2].startswith("| case | method | model | micro | zero | grad_ckpt | compile | data | img/s/GPU | MFU % |")
    assert len([ln for ln in md if ln.startswith("| step |")]) == 7 and len([ln for ln in md if ln.startswith("| loader |")]) == 2
    assert "img/s/GPU" in (out / "gpu_quick.log").read_text()


@pytest.mark.parametrize("source,decode", [("folder", "cpu"), ("pil", "cpu"), ("folder", "nvjpeg")])
def test_bench_loader_prints_json(tmp_path, capsys, source, decode):
    """docs/benchmarks.md's loader benchmark, ``python -m mimscale.bench loader --source folder|pil [--decode nvjpeg] ...``,
    through its main() in this process (no second torch import), on two class folders of small JPEGs:
    img/s and the CPU cores the loader used (this process: --workers 0)."""
    for c, wnid in enumerate(("n01440764", "n01443537")):
        (tmp_path / wnid).mkdir()
        for i in range(6):
            Image.new("RGB", (40 + 8 * i, 48), (40 * c, 20 * i, 90)).save(tmp_path / wnid / f"{wnid}_{i}.JPEG")
    code = bench.main(["loader", "--source", source, "--path", str(tmp_path), "--workers", "0", "--batch", "4",
                       "--batches", "2", "--warmup", "1", "--size", "32", "--decode", decode, "--device", "cpu", "--json"])
    assert code == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert d["bench"] == "loader" and d["source"] == source and d["images"] == 8 and d["img_per_s"] > 0
    assert d["decode"] == decode and d["device"] == "cpu" and d["cores_used"] > 0 and d["main_cores"] == pytest.approx(d["cores_used"])


def test_bench_loader_refuses_nvjpeg_without_jpeg_files(capsys):
    assert bench.main(["loader", "--source", "pil", "--path", ".", "--decode", "nvjpeg", "--device", "cpu"]) == 2
    assert "'data.decode' = nvjpeg decodes JPEG files" in capsys.readouterr().err


def test_bench_step_on_a_loader_reports_wait_and_transfer(tmp_path):
    """``--data folder``: steps on real loader batches add the data wait and the batches' copy to the
    device (pinned host memory on a GPU; on a CPU the copy is a no-op and has no GB/s)."""
    for c, wnid in enumerate(("n01440764", "n01443537")):
        (tmp_path / wnid).mkdir()
        for i in range(6):
            Image.new("RGB", (40 + 8 * i, 48), (40 * c, 20 * i, 90)).save(tmp_path / wnid / f"{wnid}_{i}.JPEG")
    d = bench_step("--method", "mae", "--data", "folder", "--data-path", str(tmp_path), "--workers", "1")
    assert d["data"] == "folder" and 0 <= d["data_wait_pct"] < 100 and d["data_wait_s"] >= 0
    assert d["pin_memory"] is False and d["h2d_gib_per_s"] is None and 0 <= d["h2d_s"] <= d["data_wait_s"] + 1e-3
    # one batch: 2 uint8 crops of 3 x 32 x 32, their boxes, flips, indices, labels and counters
    assert 2 * 3 * 32 * 32 / 2**20 < d["h2d_mib"] < 2 * 3 * 32 * 32 / 2**20 + 1e-3


def test_bench_decode_prints_json(tmp_path, capsys):
    """``python -m mimscale.bench decode --path P``: every stage timed on every JPEG, the shares derived."""
    for i in range(4):
        Image.new("RGB", (120 + 16 * i, 96), (30 * i, 90, 150)).save(tmp_path / f"img{i}.JPEG", quality=90)
    (tmp_path / "notes.txt").write_text("not an image")
    assert bench.main(["decode", "--path", str(tmp_path), "--size", "32", "--json"]) == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert d["bench"] == "decode" and d["images"] == 4 and d["subsampling"] == {"420": 4}
    assert set(d["ms_per_image"]) == set(d["median_ms"]) and all(v > 0 for v in d["ms_per_image"].values())
    assert sum(d["resize_filters"].values()) == 4 and 0 < d["entropy_share"] and 0 < d["region_over_full"]
