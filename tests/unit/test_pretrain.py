"""mimscale/pretrain.py's start-up checks that need no process group (the runs themselves are in
tests/golden and tests/integration)."""
import pytest
import yaml

from mimscale.checkpoint.checkpointer import CONFIG
from mimscale.config import load_config, to_dict
from mimscale.errors import ConfigError
from mimscale.pretrain import resume_changes


def test_a_resume_with_another_config_is_refused_unless_allowed(tmp_path):
    (tmp_path / CONFIG).write_text(yaml.safe_dump(to_dict(load_config(None, ["train.base_lr=0.1"]))))
    assert resume_changes(tmp_path, load_config(None, ["train.base_lr=0.1", "train.steps=99"])) == {}
    with pytest.raises(ConfigError, match=r"\(train.base_lr: 0.1 -> 0.3\); .*--set resume_changes=allow"):
        resume_changes(tmp_path, load_config(None, ["train.base_lr=0.3"]))
    allowed = load_config(None, ["train.base_lr=0.3", "resume_changes=allow"])
    assert resume_changes(tmp_path, allowed) == {"train.base_lr": (0.1, 0.3)}
    assert resume_changes(tmp_path / "older-tag-without-config", allowed) == {}
