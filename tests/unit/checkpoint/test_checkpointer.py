"""mimscale/checkpoint.py: which tag a run resumes from, and the Checkpointer saving and restoring
every registered part (with a stand-in engine: DeepSpeed's own save/load is exercised by the
2-rank resume tests and the golden runs)."""
import json
from pathlib import Path

import pytest
import torch

from mimscale.checkpoint.checkpointer import (
    CLIENT_KEY,
    CONFIG,
    MARKER,
    Checkpointer,
    Stateful,
    abandon_newer,
    check_resume,
    complete_tags,
    read_marker,
    resolve_resume,
    tag_for,
)
from mimscale.checkpoint.reshard import check_elastic, needs_conversion
from mimscale.errors import ConfigError


class FakeEngine:
    """DeepSpeed's save_checkpoint/load_checkpoint contract: the client state comes back mixed with
    the engine's own keys."""

    def save_checkpoint(self, root, tag, client_state, save_latest):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        torch.save(client_state, Path(root) / tag / "client.pt")

    def load_checkpoint(self, root, tag):
        return None, {**torch.load(Path(root) / tag / "client.pt"), "ds_config": {}, "global_samples": 0}

    def zero_optimization_stage(self):
        return 1


class Counter(Stateful):
    def __init__(self):
        self.n, self.mine = 0, 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]

    def rank_state_dict(self):
        return {"mine": self.mine}

    def load_rank_state_dict(self, state):
        self.mine = state.get("mine", -1)


def test_resume_picks_newest_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in ((10, True), (20, True), (30, False)):
        d = root / tag_for(step)
        d.mkdir(parents=True)
        if complete:
            (d / MARKER).write_text("{}")
    assert [s for s, _ in complete_tags(root)] == [10, 20]
    assert resolve_resume("auto", tmp_path) == root / tag_for(20)  # step 30 is half-written
    assert resolve_resume("never", tmp_path) is None
    assert resolve_resume(str(root / tag_for(10)), tmp_path) == root / tag_for(10)
    assert resolve_resume(str(tmp_path), "/elsewhere") == root / tag_for(20)
    assert resolve_resume("auto", tmp_path / "empty") is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_resume(str(root / tag_for(30)), tmp_path)


def test_check_resume_guards(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20):
        d = root / tag_for(step)
        d.mkdir(parents=True)
        (d / MARKER).write_text(json.dumps({"step": step, "world_size": 2}))
    with pytest.raises(ConfigError, match="resume=auto to continue it"):
        check_resume("never", tmp_path)  # would mix two runs' checkpoints
    assert check_resume("never", tmp_path / "fresh") is None
    assert check_resume("auto", tmp_path) == root / tag_for(20)
    # another world size: a universal-checkpoint resume (elastic.py), refused only when the batch would change
    tag = root / tag_for(20)
    assert check_elastic(tag, 2, 1, global_batch_fixed=False) is None  # the same layout (stage unknown: unchanged)
    assert "universal checkpoint" in check_elastic(tag, 4, 1, global_batch_fixed=True)
    with pytest.raises(ConfigError, match="written by 2 ranks and this run has 4; without train.global_batch"):
        check_elastic(tag, 4, 1, global_batch_fixed=False)
    (tag / MARKER).write_text(json.dumps({"step": 20, "world_size": 2, "zero_stage": 1}))
    assert needs_conversion(tag, 2, 3) and not needs_conversion(tag, 2, 1)
    assert "written by 2 ranks, ZeRO-1; this run has 2 ranks, ZeRO-3" in check_elastic(tag, 2, 3, global_batch_fixed=False)
    with pytest.raises(ConfigError, match="config key 'resume'"):
        check_resume(str(tmp_path / "checkpoints" / "nothing-here"), tmp_path)
    abandon_newer(tmp_path, 10)  # a roll-back to step 10: step 20 is set aside, not deleted
    assert [s for s, _ in complete_tags(root)] == [10]
    assert any(p.name.startswith("step00000020.abandoned-") for p in root.iterdir())



def test_checkpointer_saves_and_restores_every_part(tmp_path):
    a, b, nothing = Counter(), Counter(), Stateful()
    ckpt = Checkpointer(FakeEngine(), tmp_path, keep=2, config={"model": {"name": "vit_tiny"}})
    for name, part in (("a", a), ("b", b), ("nothing", nothing)):
        ckpt.register(name, part)
    with pytest.raises(ValueError, match="registered twice"):
        ckpt.register("a", Counter())
    for step in (1, 2, 3):
        a.n, a.mine, b.n = step, 10 * step, -step
        tag = ckpt.save(step, marker_extra={"amt_generation": step})
    assert [s for s, _ in complete_tags(tmp_path / "checkpoints")] == [2, 3]  # keep=2 pruned step 1
    assert read_marker(tag)["amt_generation"] == 3 and read_marker(tag)["step"] == 3
    assert (tag / CONFIG).read_text().startswith("model:")
    assert torch.load(tag / "client.pt")[CLIENT_KEY]["a"] == {"n": 3}

    fresh_a, fresh_b = Counter(), Counter()
    back = Checkpointer(FakeEngine(), tmp_path, keep=2)
    back.register("a", fresh_a)
    back.register("b", fresh_b)
    torch.manual_seed(123)  # the rank's RNG stream is restored to what it was at the save
    back.restore(tmp_path / "checkpoints" / tag_for(2))
    assert (fresh_a.n, fresh_a.mine, fresh_b.n) == (2, 20, -2)
    assert [s for s, _ in complete_tags(tmp_path / "checkpoints")] == [2]  # a roll-back sets step 3 aside
    assert any(p.name.startswith("step00000003.abandoned-") for p in (tmp_path / "checkpoints").iterdir())


def test_restore_names_a_part_the_checkpoint_lacks(tmp_path):
    ckpt = Checkpointer(FakeEngine(), tmp_path, keep=1)
    ckpt.register("a", Counter())
    tag = ckpt.save(5)
    back = Checkpointer(FakeEngine(), tmp_path, keep=1)
    back.register("a", Counter())
    back.register("method", Counter())
    with pytest.raises(RuntimeError, match="no state for method"):
        back.restore(tag)


def test_missing_rank_file_gives_parts_an_empty_rank_state(tmp_path):
    part = Counter()
    ckpt = Checkpointer(FakeEngine(), tmp_path, keep=1)
    ckpt.register("a", part)
    tag = ckpt.save(4)
    (tag / "rng_rank0.pt").unlink()  # as on a rank that did not exist when the tag was written
    part.mine = 99
    ckpt.restore(tag)
    assert part.mine == -1


def test_checkpoints_of_the_flat_client_layout_still_load(tmp_path):
    """Tags written before the Checkpointer (flat mim_* / amt_* client keys) resume as before."""
    tag = tmp_path / "checkpoints" / tag_for(7)
    tag.mkdir(parents=True)
    torch.save({"mim_step": 7, "mim_samples_seen": 112, "mim_skipped_images": 1, "mim_converted_images": 2,
                "mim_mlflow_run_id": "abc", "amt_generation": 1, "amt_refreshes": [{"generation": 1}]}, tag / "client.pt")
    torch.save({"python": __import__("random").getstate(), "numpy": __import__("numpy").random.get_state(),
                "torch": torch.get_rng_state(), "rank_state": {"data": {"workers": 1, "cursors": {}}}}, tag / "rng_rank0.pt")
    (tag / MARKER).write_text(json.dumps({"step": 7}))

    class Keep(Stateful):
        def load_state_dict(self, state):
            self.got = state

        def load_rank_state_dict(self, state):
            self.rank_got = state

    parts = {name: Keep() for name in ("train", "data", "method", "tracking")}
    ckpt = Checkpointer(FakeEngine(), tmp_path, keep=1)
    for name, part in parts.items():
        ckpt.register(name, part)
    ckpt.restore(tag)
    assert parts["train"].got == {"step": 7, "samples_seen": 112, "skipped": 1, "converted": 2}
    assert parts["tracking"].got == {"run_id": "abc"}
    assert parts["method"].got == {"generation": 1, "refreshes": [{"generation": 1}]}
    assert parts["data"].rank_got == {"workers": 1, "cursors": {}}


def test_read_marker_of_an_empty_marker_falls_back_to_the_tag_name(tmp_path):
    tag = tmp_path / tag_for(12)
    tag.mkdir()
    (tag / MARKER).write_text("")
    assert read_marker(tag)["step"] == 12


def test_marker_lists_every_file_and_is_published_whole(tmp_path):
    ckpt = Checkpointer(FakeEngine(), tmp_path, keep=3, config={"a": 1})
    ckpt.register("a", Counter())
    tag = ckpt.save(1)
    files = json.loads((tag / MARKER).read_text())["files"]
    assert set(files) == {"client.pt", "rng_rank0.pt", CONFIG}
    assert all(files[n] == (tag / n).stat().st_size > 0 for n in files)
    assert not (tag / (MARKER + ".tmp")).exists()


@pytest.mark.parametrize("damage, named", [
    (lambda tag: (tag / "client.pt").write_bytes((tag / "client.pt").read_bytes()[:10]), "client.pt has 10 bytes"),
    (lambda tag: (tag / "rng_rank0.pt").unlink(), "rng_rank0.pt is missing"),
    (lambda tag: (tag / MARKER).write_text(""), "COMPLETE is empty or torn"),
    (lambda tag: (tag / MARKER).write_text('{"step": 3, "fi'), "COMPLETE is empty or torn"),
])
def test_a_damaged_newest_tag_is_set_aside_and_resume_falls_back(tmp_path, capsys, damage, named):
    ckpt = Checkpointer(FakeEngine(), tmp_path, keep=3)
    ckpt.register("a", Counter())
    for step in (2, 3):
        tag = ckpt.save(step)
    damage(tag)
    assert resolve_resume("auto", tmp_path) == tmp_path / "checkpoints" / tag_for(2)  # export/eval: skipped, not moved
    assert named in capsys.readouterr().err and (tmp_path / "checkpoints" / tag_for(3)).is_dir()
    assert resolve_resume("auto", tmp_path, repair=True) == tmp_path / "checkpoints" / tag_for(2)  # a resume sets it aside
    assert named in capsys.readouterr().err
    aside = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step00000003.damaged-")]
    assert len(aside) == 1 and any(aside[0].iterdir())  # kept, not deleted
    with pytest.raises(FileNotFoundError, match="damaged checkpoint"):
        damage_path = tmp_path / "other"
        Checkpointer(FakeEngine(), damage_path, keep=1).save(1)
        (damage_path / "checkpoints" / tag_for(1) / MARKER).write_text("")
        resolve_resume(str(damage_path / "checkpoints" / tag_for(1)), damage_path)


def _draws() -> list:
    """One draw from each stream a rank file restores (python, numpy incl. its cached gaussian, torch)."""
    import random

    import numpy as np

    return [random.random(), random.gauss(0, 1), np.random.random(), np.random.standard_normal(), torch.rand(3).tolist()]


def test_rng_state_round_trips_exactly_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    from mimscale.checkpoint.checkpointer import rng_state, set_rng_state

    random.gauss(0, 1), np.random.standard_normal()  # leave a cached gaussian in both
    torch.save(rng_state(), tmp_path / "rng.pt")
    first = _draws()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))  # no allowlist needed
    assert _draws() == first


def test_a_rank_file_from_before_safe_rng_files_still_restores(tmp_path):
    """Rank files once held numpy's state as an ndarray: read weights-only with numpy's array
    globals allowed, the streams and the rank state come back."""
    import random

    import numpy as np

    ckpt = Checkpointer(FakeEngine(), tmp_path, keep=1)
    part = Counter()
    ckpt.register("a", part)
    tag = ckpt.save(1)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "rank_state": {"a": {"mine": 7}}}
    torch.save(old, tag / "rng_rank0.pt")
    first = _draws()
    Checkpointer(FakeEngine(), tmp_path, keep=1).restore(tag)
    assert _draws() == first
    back = Checkpointer(FakeEngine(), tmp_path, keep=1)
    fresh = Counter()
    back.register("a", fresh)
    back.restore(tag)
    assert fresh.mine == 7


class _Poison:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")  # unpickled unsafely: creates the marker file


def test_a_poisoned_rank_file_is_refused_naming_it(tmp_path):
    from mimscale.checkpoint.safe_load import UnsafeFileError

    ckpt = Checkpointer(FakeEngine(), tmp_path, keep=1)
    ckpt.register("a", Counter())
    tag = ckpt.save(1)
    marker = tmp_path / "ran"
    torch.save({"python": _Poison(marker), "rank_state": {}}, tag / "rng_rank0.pt")
    with pytest.raises(UnsafeFileError, match="rng_rank0.pt") as e:
        ckpt.restore(tag)
    assert str(tag / "rng_rank0.pt") in str(e.value)
    assert not marker.exists()


def test_the_loops_counters_round_trip_and_load_strictly():
    from mimscale.checkpoint.checkpointer import TrackingState, TrainState

    s = TrainState(step=5, samples_seen=80, skipped=1, converted=2)
    back = TrainState()
    back.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert back == s
    with pytest.raises(KeyError):
        TrainState().load_state_dict({"step": 1})
    other = TrackingState()
    other.load_state_dict(TrackingState("run-1").state_dict())
    assert other.run_id == "run-1"
