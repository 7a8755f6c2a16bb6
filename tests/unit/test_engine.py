"""mimscale/engine.py's pieces that run without an engine: the checkpointed counters and the
metrics file a resume trims (the loop itself runs in tests/golden and tests/integration)."""
import json

from mimscale.engine import TrackingState, TrainState, metrics_lines_upto


def test_train_state_round_trips_and_loads_strictly():
    s = TrainState(step=5, samples_seen=80, skipped=1, converted=2)
    back = TrainState()
    back.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert back == s
    t = TrackingState("run-1")
    other = TrackingState()
    other.load_state_dict(t.state_dict())
    assert other.run_id == "run-1"


def test_metrics_file_keeps_steps_up_to_the_resume_and_drops_a_torn_line(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    keep = metrics_lines_upto(path, 3)
    assert [json.loads(line)["step"] for line in keep] == [1, 2, 3]
    assert "dropped a torn line" in capsys.readouterr().err
