"""Every shell command in README.md is exercised: by a test, CI or `make demo` named in COVERED (and
the named file really contains the command's key tokens), or its code block is marked in the
README as not run here, with the reason (a GPU cluster, a Docker daemon, a browser):

    <!-- not run in CI (deepspeed --num_gpus 8, docker/): needs 8 GPUs and ImageNet -->
    ```bash
    ...

The parenthesised command prefixes limit the mark to those commands of the block; without them it
covers the whole block. A new README command fails test_every_readme_command_is_exercised, naming
it: add a COVERED entry (a regex for the command, the file that runs it, its tokens there) or mark
its block.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHELL_FENCES = {"bash", "sh", "shell", "console"}
MARK = re.compile(r"<!--\s*not run in CI(?:\s*\(([^)]*)\))?:\s*(.*?)\s*-->")


@dataclass(frozen=True)
class Command:
    line: int  # README line the command starts on
    text: str  # continuations joined, trailing comment dropped, whitespace collapsed
    unrun: str | None = None  # the README's reason, when its block is marked as not run in CI


@dataclass(frozen=True)
class Covered:
    pattern: str  # a regex that fullmatches the README command
    runs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # file -> strings it contains that run it


def readme_commands(text: str) -> list[Command]:
    """The commands of the shell code blocks (``` with bash, sh, shell or console)."""
    lines = text.splitlines()
    out: list[Command] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"\s*```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        marks, j = [], i - 1
        while j >= 0 and MARK.search(lines[j]):
            marks.append(MARK.search(lines[j]))
            j -= 1
        end = next(k for k in range(i + 1, len(lines)) if re.match(r"\s*```\s*$", lines[k]))
        if fence.group(1) in SHELL_FENCES:
            k = i + 1
            while k < end:
                start, parts = k, [lines[k]]
                while parts[-1].rstrip().endswith("\\") and k + 1 < end:
                    k += 1
                    parts.append(lines[k])
                k += 1
                cmd = " ".join(p.rstrip().removesuffix("\\") for p in parts)
                cmd = " ".join(re.sub(r"(^|\s)#.*$", "", cmd).split())
                if cmd:
                    out.append(Command(start + 1, cmd, _reason(cmd, marks)))
        i = end + 1
    return out


def _reason(cmd: str, marks: list[re.Match]) -> str | None:
    for m in marks:
        prefixes = [p.strip() for p in (m.group(1) or "").split(",") if p.strip()]
        if not prefixes or any(cmd.startswith(p) for p in prefixes):
            assert m.group(2), f"a 'not run in CI' mark without a reason: {m.group(0)}"
            return m.group(2)
    return None


# README command -> what runs it. Add an entry when the README gains a command; `runs` names each
# file that exercises it and strings found there (a test's argv, a make recipe, CI's steps).
COVERED = [
    Covered(r"make setup", {".ci/run": ("make lint",), "Makefile": ("lint: setup",)}),
    Covered(r"make test", {".ci/run": ("make test",)}),
    Covered(r"make lint", {".ci/run": ("make lint",)}),
    # the same pytest run without -m "not slow": the tests it adds are the slow-marked ones
    Covered(r"make test-all", {"Makefile": ("test-all: setup", "pytest -q --durations=15 tests")}),
    Covered(r"make test-py312", {".ci/run": ("make test-py312",)}),
    Covered(r"make setup PYTHON=python3\.12", {"Makefile": ('bash scripts/find_python.sh $(PYTHON)',),
                                                 "tests/unit/test_setup.py": ("pyenv shim", "3.12.1")}),
    # make demo: the demo run itself (its script, with each SOURCE and METHOD branch)
    Covered(r"make demo", {"Makefile": ("bash scripts/demo.sh $(SOURCE) $(SAMPLE) $(METHOD)",)}),
    Covered(r"make demo SOURCE=wds", {"scripts/demo.sh": ("-m data_prep.wds --src", "data.source=wds")}),
    Covered(r"make demo METHOD=(amt|automae)", {"scripts/demo.sh": ("mimscale/configs/${METHOD}_vit_tiny_cpu.yaml",)}),
    Covered(r"make bench", {"Makefile": ("mimscale.bench step --method mae --model vit_base",),
                            "tests/integration/test_bench.py": ('"-m", "mimscale.bench", "step"',)}),
    Covered(r"python -m data_prep\.wds --src \S+ --split train --out \S+ .*",
            {"tests/unit/data_prep/test_data_prep.py": ('"-m", "data_prep.wds", "--src"', '"--shard-size"', '"--workers"')}),
    Covered(r"python -m data_prep\.ffcv --src \S+ --split train --out \S+ .*",
            {"scripts/demo.sh": ("-m data_prep.ffcv --src",), "tests/unit/data_prep/test_data_prep.py": ("jpeg_quality=90",)}),
    Covered(r"python -m data_prep\.verify \S+", {"tests/unit/data_prep/test_data_prep.py": ('"-m", "data_prep.verify"',)}),
    Covered(r"python -m mimscale\.export --checkpoint \S+ --out \S+ .*",
            {"tests/integration/test_export.py": ('"-m", "mimscale.export"', '"--dtype"', "pass --force")}),
    Covered(r"python -m mimscale\.eval (probe|knn|cka) +--checkpoint \S+ --data \S+ .*",
            {"tests/unit/eval/test_eval.py": ('run_cli(capsys, "probe"', 'run_cli(capsys, "knn"', 'run_cli(capsys, "cka"')}),
    Covered(r"deepspeed --num_gpus \d+ --module mimscale\.eval probe \.\.\.",
            {"tests/integration/test_eval.py": ('"--num_gpus", "2"', '"--module", "mimscale.eval"')}),
    Covered(r"python -m mimscale\.bench step --method (mae|amt|automae)( --extractor \S+)? --model vit_base .*",
            {"tests/integration/test_bench.py": ('bench_step("--method", "mae"', 'bench_step("--method", "amt"',
                                                 'bench_step("--method", "automae", "--extractor"')}),
    Covered(r"python -m mimscale\.bench loader --source \S+ --path \S+ .*",
            {"tests/integration/test_bench.py": ('"loader", "--source"',)}),
    Covered(r"python -m mimscale\.bench decode --path \S+ .*", {"tests/integration/test_bench.py": ('"decode", "--path"',)}),
    # on a GPU node; the plumbing test runs the same module on CPU (--tiny)
    Covered(r"make bench-gpu FFCV_BETON=\S+", {"Makefile": ("bench-gpu: setup", "-m benchmarks.gpu"),
                                                "tests/integration/test_bench.py": ('"-m", "benchmarks.gpu", "--tiny"',)}),
    # the --budget run is the --quick run's code with a step budget instead of 6 steps
    Covered(r"python -m benchmarks\.quality --data \S+ .*",
            {"tests/integration/test_quality.py": ('"-m", "benchmarks.quality"', '"--methods"', '"--quick"')}),
]


def covering(cmd: str) -> list[Covered]:
    return [c for c in COVERED if re.fullmatch(c.pattern, cmd)]


def test_every_readme_command_is_exercised():
    missing = [f"README.md:{c.line}: {c.text}" for c in readme_commands((REPO / "README.md").read_text())
               if c.unrun is None and not covering(c.text)]
    assert not missing, ("README commands that nothing runs; add each to COVERED in tests/unit/test_readme.py "
                         "(the file that runs it, its tokens there), or mark its block "
                         "'<!-- not run in CI (prefix): reason -->':\n  " + "\n  ".join(missing))


@pytest.mark.parametrize("entry", COVERED, ids=lambda c: c.pattern)
def test_each_covering_file_runs_the_command(entry):
    for path, tokens in entry.runs.items():
        text = (REPO / path).read_text()
        for token in tokens:
            assert token in text, f"COVERED[{entry.pattern!r}]: {path} does not contain {token!r}"


def test_covered_entries_name_readme_commands():
    """A stale entry (its command left the README) is dropped, so the table says what is true."""
    cmds = [c.text for c in readme_commands((REPO / "README.md").read_text())]
    stale = [c.pattern for c in COVERED if not any(re.fullmatch(c.pattern, cmd) for cmd in cmds)]
    assert not stale, f"COVERED entries that match no README command: {stale}"


def test_marked_blocks_say_why():
    unrun = [c for c in readme_commands((REPO / "README.md").read_text()) if c.unrun is not None]
    assert unrun and all(len(c.unrun) > 10 for c in unrun)


def test_extraction_joins_continuations_and_honours_marks():
    text = "\n".join([
        "```bash",
        "make setup   # a comment",
        "# a whole-line comment",
        "deepspeed --num_gpus 8 x.py \\",
        "    --set a=1",
        "```",
        "```python",
        "import timm",
        "```",
        "<!-- not run in CI (sbatch): needs a Slurm cluster -->",
        "```bash",
        "mkdir -p logs",
        "sbatch job.sbatch",
        "```",
    ])
    got = [(c.line, c.text, c.unrun) for c in readme_commands(text)]
    assert got == [(2, "make setup", None), (4, "deepspeed --num_gpus 8 x.py --set a=1", None),
                   (12, "mkdir -p logs", None), (13, "sbatch job.sbatch", "needs a Slurm cluster")]
    assert covering("make setup") and not covering("make setup --oops")
