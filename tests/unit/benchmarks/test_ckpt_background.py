"""benchmarks/ckpt_background.py's reading of a run: the stall is the line after each save's."""
import json

from benchmarks.ckpt_background import summarize


def test_summarize_reads_stalls_from_the_line_after_each_save(tmp_path):
    lines = [{"step": s, "step_s": 1.0 if s not in (5, 9) else 3.0, "time/ckpt_s": {5: 7.0, 9: 5.0}.get(s, 0.0)}
             for s in range(1, 11)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 10, "cka": 1}\n')
    (tmp_path / "checkpoints" / "step00000008").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step00000008" / "f.pt").write_bytes(b"x" * 1024)
    r = summarize(tmp_path, ckpt_every=4)
    assert r["saves"] == 2 and r["save_stall_s"] == 6.0 and r["step_after_save_s"] == 3.0
    assert r["step_s"] == 1.0 and r["tag_gib"] == 1024 / 2**30
