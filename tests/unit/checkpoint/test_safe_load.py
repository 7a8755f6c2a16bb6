"""mimscale/safe_load.py: no pickle mimscale reads runs code, and genuine DeepSpeed checkpoints
still load.

A poisoned pickle here is an object whose ``__reduce__`` calls ``open(marker, "w")``: unpickled
the unsafe way it creates the marker file (``test_the_poison_is_real``); every safe path must
refuse it with an error naming the file, and leave no marker.

Genuine checkpoints are written by real DeepSpeed engines (a world of one, in a subprocess: this
process stays without a process group) for ZeRO-1, 2 and 3 in fp32 and bf16: each is consolidated
here through zero_to_fp32 under the allowlist, and resumed in the subprocess into a fresh engine
whose next steps must match the original's exactly. Run this file as a module
(``python -m tests.unit.checkpoint.test_safe_load OUT``) to write them.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mimscale.checkpoint import safe_load, weights
from mimscale.runtime import dist

REPO = Path(__file__).resolve().parents[3]
TAGS = [f"zero{stage}_{dtype}" for dtype in ("fp32", "bf16") for stage in (1, 2, 3)]
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"  # bf16_ in front under bf16


class Poison:
    """Unpickled unsafely, creates ``marker`` (stands in for any code a pickle can run)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def poison(path: Path, marker: Path, wrap=lambda p: p, raw: bool = False) -> Path:
    """A poisoned file at ``path``: torch's zip format (``wrap`` nests the poison like the real
    file's contents), or a bare pickle (``raw``, torch's legacy format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if raw:
        path.write_bytes(pickle.dumps(wrap(Poison(marker)), protocol=2))  # the protocol torch.save writes
    else:
        torch.save(wrap(Poison(marker)), path)
    return path


def refused(call, path: Path, marker: Path) -> str:
    """``call()`` must raise UnsafeFileError naming ``path``, without creating ``marker``."""
    with pytest.raises(safe_load.UnsafeFileError) as e:
        call()
    assert str(path) in str(e.value) and "open" in str(e.value)
    assert not marker.exists(), "the poisoned pickle ran"
    return str(e.value)


def test_the_poison_is_real(tmp_path):
    marker = tmp_path / "ran"
    f = poison(tmp_path / "evil.pt", marker)
    torch.load(f, weights_only=False)  # what DeepSpeed does: runs it
    assert marker.exists()


@pytest.mark.parametrize("raw", [False, True], ids=["zip", "legacy"])
def test_load_refuses_a_poisoned_file_naming_it(tmp_path, raw):
    marker = tmp_path / "ran"
    f = poison(tmp_path / "evil.pt", marker, wrap=lambda p: {"state": {"n": 1, "x": p}}, raw=raw)
    refused(lambda: safe_load.load(f), f, marker)
    refused(lambda: safe_load.load(f, extra=safe_load.numpy_array_globals()), f, marker)
    torch.save({"w": torch.arange(3)}, tmp_path / "plain.pt")
    assert torch.equal(safe_load.load(tmp_path / "plain.pt")["w"], torch.arange(3))


def test_deepspeed_loads_forces_weights_only_and_puts_torch_load_back(tmp_path):
    marker = tmp_path / "ran"
    f = poison(tmp_path / "evil.pt", marker)
    original = torch.load
    with safe_load.deepspeed_loads():
        assert torch.load is not original
        refused(lambda: torch.load(f, map_location="cpu", weights_only=False), f, marker)  # DeepSpeed's call
        with open(f, "rb") as fh:  # a file object is named by its name
            refused(lambda: torch.load(fh, weights_only=False), f, marker)
    assert torch.load is original
    with pytest.raises(KeyError), safe_load.deepspeed_loads():
        raise KeyError("any error inside")
    assert torch.load is original


def test_a_state_dict_file_given_by_path_is_refused(tmp_path):
    marker = tmp_path / "ran"
    f = poison(tmp_path / "timm.pth", marker, wrap=lambda p: {"model": {"cls_token": torch.zeros(1, 1, 192), "x": p}})
    refused(lambda: weights.extractor_state(f), f, marker)  # AutoMAE's frozen extractor, eval
    (tmp_path / "mimscale.json").write_text(json.dumps({"mimscale": {"model": {"name": "vit_tiny", "img_size": 32}}}))
    refused(lambda: weights.load_encoder(f), f, marker)  # a weights file with an export's mimscale.json beside it


# --- genuine DeepSpeed checkpoints -----------------------------------------------------------


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    """{tag: results} and the folder of the tags written by ``write_checkpoints`` in a subprocess."""
    from tests.integration.launch import env, free_port

    out = tmp_path_factory.mktemp("ds")
    e = {**env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(free_port())}
    r = subprocess.run([sys.executable, "-m", "tests.unit.checkpoint.test_safe_load", str(out)], cwd=REPO, env=e,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return out, json.loads((out / "results.json").read_text())


def test_the_allowlist_is_exactly_what_deepspeed_writes(genuine):
    out, _ = genuine
    allowed = {f"{m}.{n}" for m, n in safe_load.DEEPSPEED_GLOBALS}
    seen = set()
    for tag in TAGS:
        files = sorted((out / tag).glob("*.pt"))
        assert len(files) == 2, files  # model states and optimizer states
        for f in files:
            needs = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(f)))
            assert needs <= allowed, f"{f.name} needs {needs - allowed}"
            seen |= needs
    assert seen == allowed  # nothing allowed that no file needs


@pytest.mark.parametrize("tag", TAGS)
def test_genuine_checkpoints_consolidate_as_before(genuine, tag):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out, _ = genuine
    original = torch.load
    safe = weights.consolidate(out / tag, ("encoder", "decoder"))
    assert torch.load is original
    unsafe = get_fp32_state_dict_from_zero_checkpoint(str(out), tag=tag)  # DeepSpeed's own (unpickling) reading
    for part in ("encoder", "decoder"):
        want = {k[len(part) + 1:]: v for k, v in unsafe.items() if k.startswith(part + ".")}
        assert set(safe[part]) == set(want) and want
        assert all(safe[part][k].dtype == torch.float32 and torch.equal(safe[part][k], want[k]) for k in want)


@pytest.mark.parametrize("tag", TAGS)
def test_genuine_checkpoints_resume_exactly(genuine, tag):
    result = genuine[1][tag]
    assert result["client"] == {"train": {"step": 1}}
    assert result["resumed"] == result["expected"]  # the next step's loss and the one after it
    assert result["before_load"] != result["expected"][0]  # the fresh engine's own weights did differ


@pytest.mark.parametrize("which", ["model_states", "optim_states"])
def test_a_poisoned_shard_is_refused_by_consolidation(genuine, tmp_path, which):
    out, _ = genuine
    tag = tmp_path / "checkpoints" / "step00000001"
    shutil.copytree(out / "zero2_fp32", tag)
    marker = tmp_path / "ran"
    f = poison(tag / ("mp_rank_00_model_states.pt" if which == "model_states" else OPTIM), marker,
               wrap=lambda p: {"optimizer_state_dict": p, "buffer_names": p})
    refused(lambda: weights.extractor_state(tmp_path), f, marker)  # the run's folder, as AutoMAE's extractor
    assert torch.load is torch.serialization.load


def test_a_poisoned_shard_is_refused_on_resume(genuine):
    """engine.load_checkpoint under deepspeed_loads (as Checkpointer.restore calls it)."""
    for which, message in genuine[1]["poisoned"].items():
        assert message.startswith("UnsafeFileError: refused to load") and which in message, message
    assert not (genuine[0] / "ran").exists()


# --- the writer (run in a subprocess by the ``genuine`` fixture) -------------------------------


class _Tiny(torch.nn.Module):
    """Top-level ``encoder`` and ``decoder``, as MIMModel's, and a buffer."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16))
        self.decoder = torch.nn.Linear(16, 4)
        self.register_buffer("scale", torch.full((4,), 0.5))

    def forward(self, x):
        return (self.decoder(self.encoder(x)) * self.scale).float().pow(2).mean()


def _engine(stage: int, dtype: str, seed: int):
    import deepspeed

    from mimscale.optim import build_optimizer

    torch.manual_seed(seed)
    model = _Tiny()
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
           "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    opt = build_optimizer(model, 1e-2, 0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=cfg)
    return engine


def _step(engine, x) -> float:
    loss = engine(x)
    engine.backward(loss)
    engine.step()
    return loss.item()


def write_checkpoints(out: Path) -> None:
    dist.init_distributed()  # unlinks DeepSpeed's /dev/shm workspace, as a run does
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 8, generator=g) for _ in range(3)]
    results: dict = {}
    for tag in TAGS:
        stage, dtype = int(tag[4]), tag.split("_")[1]
        batches = [x.to(torch.bfloat16 if dtype == "bf16" else torch.float32) for x in xs]
        engine = _engine(stage, dtype, seed=0)
        _step(engine, batches[0])
        engine.save_checkpoint(str(out), tag=tag, client_state={"mimscale": {"train": {"step": 1}}}, save_latest=False)
        (out / tag / "COMPLETE").write_text(json.dumps({"step": 1, "world_size": 1}))
        expected = [_step(engine, batches[1]), _step(engine, batches[2])]
        fresh = _engine(stage, dtype, seed=1)  # other initial weights
        with torch.no_grad():
            before = fresh(batches[1]).item()
        with safe_load.deepspeed_loads():
            _, client = fresh.load_checkpoint(str(out), tag=tag)
        results[tag] = {"client": client["mimscale"], "expected": expected, "before_load": before,
                        "resumed": [_step(fresh, batches[1]), _step(fresh, batches[2])]}
    results["poisoned"] = {}
    for which, src, name in (("model_states", "zero1_fp32", "mp_rank_00_model_states.pt"),
                             ("optim_states", "zero3_fp32", OPTIM)):
        bad = f"poisoned_{which}"
        shutil.copytree(out / src, out / bad)
        torch.save({"optimizer_state_dict": Poison(out / "ran"), "module": Poison(out / "ran")}, out / bad / name)
        try:
            with safe_load.deepspeed_loads():
                _engine(int(src[4]), "fp32", seed=1).load_checkpoint(str(out), tag=bad)
            results["poisoned"][which] = "loaded"
        except Exception as e:
            results["poisoned"][which] = f"{type(e).__name__}: {e}"
        assert torch.load is torch.serialization.load
        shutil.rmtree(out / bad)
    (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    write_checkpoints(Path(sys.argv[1]))
    os._exit(0)  # skip DeepSpeed's and gloo's teardown
