"""Every shell command in the user docs (README.md and docs/*.md) is exercised: by a test, CI or
`make demo` named in COVERED (and the named file really contains the command's key tokens), or its
code block is marked in the page as not run here, with the reason (a GPU cluster, a Docker daemon,
a browser):

    <!-- not run in CI (deepspeed --num_gpus 8, docker/): needs 8 GPUs and ImageNet -->
    ```bash
    ...

The parenthesised command prefixes limit the mark to those commands of the block; without them it
covers the whole block. A new command fails test_every_readme_command_is_exercised, naming its page
and line: add a COVERED entry (a regex for the command, the file that runs it, its tokens there) or
mark its block. The pages' relative links must lead to files and headings that exist, and no page
points at this machine's sibling folders (`../shared`), which a user does not have.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The front page stays a front page; the reference lives in docs/.
README_MAX_LINES = 200
SHELL_FENCES = {"bash", "sh", "shell", "console"}
MARK = re.compile(r"<!--\s*not run in CI(?:\s*\(([^)]*)\))?:\s*(.*?)\s*-->")


def pages() -> list[Path]:
    """The user docs: the front page and every page of docs/."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Command:
    line: int  # the page's line the command starts on
    text: str  # continuations joined, trailing comment dropped, whitespace collapsed
    unrun: str | None = None  # the page's reason, when its block is marked as not run in CI


@dataclass(frozen=True)
class Covered:
    pattern: str  # a regex that fullmatches the page's command
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


# Page command -> what runs it. Add an entry when a page gains a command; `runs` names each file
# that exercises it and strings found there (a test's argv, a make recipe, CI's steps). A `mimscale
# <command>` entry names the console command's test (tests/unit/test_cli.py: the subcommand reaches its
# module) and the module's own test (the options).
CLI = "tests/unit/test_cli.py"
COVERED = [
    # installing and the console command
    Covered(r"pip install \.", {CLI: ("pip", "install")}),
    Covered(r"mimscale --version", {CLI: ("--version",)}),
    Covered(r"mimscale presets", {CLI: ("presets",)}),
    Covered(r"mimscale config list", {CLI: ("config", "list")}),
    # pretraining by preset and ds_config names, several --set pairs; the resolved config before a launch
    Covered(r"python -m mimscale\.pretrain --config \w+ --deepspeed_config \w+ --set data\.source=synthetic .*",
            {CLI: ("mimscale.pretrain", "data.source=synthetic")}),
    Covered(r"python -m mimscale\.pretrain --config \w+ --deepspeed_config \w+ --(print-config|dry-run)",
            {CLI: ("--print-config", "--dry-run")}),
    Covered(r"make setup", {".ci/run": ("make lint",), "Makefile": ("lint: setup",)}),
    Covered(r"make test", {".ci/run": ("make test",)}),
    Covered(r"make lint", {".ci/run": ("make lint",)}),
    # the same pytest run without -m "not slow": the tests it adds are the slow-marked ones
    Covered(r"make test-all", {"Makefile": ("test-all: setup", "pytest -q --durations=15 tests")}),
    # the same pytest run on tests/unit alone
    Covered(r"make test-fast", {"Makefile": ("test-fast: setup", "pytest -q tests/unit")}),
    Covered(r"make test-py312", {".ci/run": ("make test-py312",)}),
    Covered(r"make setup PYTHON=python3\.12", {"Makefile": ('bash scripts/find_python.sh $(PYTHON)',),
                                                 "tests/unit/test_setup.py": ("pyenv shim", "3.12.1")}),
    Covered(r"make clean", {"Makefile": ("clean:", "rm -rf runs .pytest_cache")}),
    # make demo: the demo run itself (its script, with each SOURCE, SAMPLE and METHOD branch)
    Covered(r"make demo", {"Makefile": ("bash scripts/demo.sh $(SOURCE) $(SAMPLE) $(METHOD)",)}),
    Covered(r"make demo SAMPLE=\S+", {"Makefile": ("bash scripts/demo.sh $(SOURCE) $(SAMPLE) $(METHOD)",),
                                      "scripts/demo.sh": ("SAMPLE=${2:-", "data.path=$SAMPLE", "using synthetic images")}),
    Covered(r"make demo SOURCE=wds", {"scripts/demo.sh": ("-m data_prep.wds --src", "data.source=wds")}),
    Covered(r"make demo METHOD=(amt|automae)", {"scripts/demo.sh": ("mimscale/configs/${METHOD}_vit_tiny_cpu.yaml",)}),
    Covered(r"make bench", {"Makefile": ("mimscale.bench step --method mae --model vit_base",),
                            "tests/integration/test_bench.py": ('"-m", "mimscale.bench", "step"',)}),
    Covered(r"mimscale prep-wds --src \S+ --split train --out \S+ .*",
            {CLI: ("prep-wds",),
             "tests/unit/data_prep/test_data_prep.py": ('"-m", "data_prep.wds", "--src"', '"--shard-size"', '"--workers"')}),
    Covered(r"mimscale prep-ffcv --src \S+ --split train --out \S+ .*",
            {CLI: ("prep-ffcv",), "scripts/demo.sh": ("-m data_prep.ffcv --src",),
             "tests/unit/data_prep/test_data_prep.py": ("jpeg_quality=90",)}),
    Covered(r"mimscale verify \S+", {CLI: ("verify",), "tests/unit/data_prep/test_data_prep.py": ('"-m", "data_prep.verify"',)}),
    Covered(r"mimscale report \S+", {CLI: ("report",), "tests/unit/test_report.py": ("report.main([str(out)",)}),
    Covered(r"mimscale export --checkpoint \S+ --out \S+( .*)?",
            {CLI: ("export",), "tests/integration/test_export.py": ('"-m", "mimscale.export"', '"--dtype"', "pass --force")}),
    Covered(r"mimscale eval (probe|knn|cka) +--checkpoint \S+ --data \S+ .*",
            {CLI: ("eval",), "tests/unit/eval/test_eval.py": ('run_cli(capsys, "probe"', 'run_cli(capsys, "knn"', 'run_cli(capsys, "cka"',
                                                              '"--recipe", "mae"')}),
    Covered(r"deepspeed --num_gpus \d+ --module mimscale\.eval probe \.\.\.",
            {"tests/integration/test_eval.py": ('"--num_gpus", "2"', '"--module", "mimscale.eval"')}),
    Covered(r"python -m mimscale\.plan --config \S+ --deepspeed_config \S+ --gpus \d+ --gpu-mem-gib \d+ .*",
            {"tests/unit/test_plan.py": ('"-m", "mimscale.plan"', '"--gpus", "64"', '"--gpu-mem-gib", "80", "--json"')}),
    Covered(r"mimscale bench step --method (mae|amt|automae)( --extractor \S+)? --model vit_base .*",
            {CLI: ("bench",), "tests/integration/test_bench.py": ('bench_step("--method", "mae"', 'bench_step("--method", "amt"',
                                                                   'bench_step("--method", "automae", "--extractor"')}),
    Covered(r"mimscale bench loader --source \S+ --path \S+ .*",
            {CLI: ("bench",), "tests/integration/test_bench.py": ('"loader", "--source"',)}),
    Covered(r"mimscale bench decode --path \S+ .*", {CLI: ("bench",), "tests/integration/test_bench.py": ('"decode", "--path"',)}),
    # on a GPU node; the plumbing test runs the same module on CPU (--tiny)
    Covered(r"make bench-gpu FFCV_BETON=\S+", {"Makefile": ("bench-gpu: setup", "-m benchmarks.gpu"),
                                                "tests/integration/test_bench.py": ('"-m", "benchmarks.gpu", "--tiny"',)}),
    # the --budget run is the --quick run's code with a step budget instead of 6 steps
    Covered(r"python -m benchmarks\.quality --data \S+ .*",
            {"tests/integration/test_quality.py": ('"-m", "benchmarks.quality"', '"--methods"', '"--quick"')}),
    # the sweep and its table: the slow test runs main() on two cells of 3 steps, then again from the cache
    Covered(r"python -m benchmarks\.ablate --data \S+( .*)?",
            {"tests/unit/benchmarks/test_ablate.py": ("ablate.main(argv)", '"--steps", "3"')}),
]


def all_commands() -> list[tuple[str, Command]]:
    """(page relative to the repository, command) for every shell command of every page."""
    return [(str(p.relative_to(REPO)), c) for p in pages() for c in readme_commands(p.read_text())]


def covering(cmd: str) -> list[Covered]:
    return [c for c in COVERED if re.fullmatch(c.pattern, cmd)]


def test_every_readme_command_is_exercised():
    missing = [f"{page}:{c.line}: {c.text}" for page, c in all_commands() if c.unrun is None and not covering(c.text)]
    assert not missing, ("commands of README.md or docs/ that nothing runs; add each to COVERED in tests/unit/test_readme.py "
                         "(the file that runs it, its tokens there), or mark its block "
                         "'<!-- not run in CI (prefix): reason -->':\n  " + "\n  ".join(missing))


def test_the_pages_are_read():
    """docs/ is read too: its pages' commands count (a page outside the list would escape the check)."""
    read = {str(p.relative_to(REPO)) for p in pages()}
    assert "README.md" in read and {"docs/running.md", "docs/architecture.md"} <= read
    assert {page for page, _ in all_commands()} >= {"README.md", "docs/data.md", "docs/running.md"}


@pytest.mark.parametrize("entry", COVERED, ids=lambda c: c.pattern)
def test_each_covering_file_runs_the_command(entry):
    problems = []
    for path, tokens in entry.runs.items():
        if not (REPO / path).is_file():
            problems.append(f"{path} does not exist")
            continue
        text = (REPO / path).read_text()
        problems += [f"{path} does not contain {token!r}" for token in tokens if token not in text]
    assert not problems, f"COVERED[{entry.pattern!r}]: " + "; ".join(problems)


def test_covered_entries_name_readme_commands():
    """A stale entry (its command left the pages) is dropped, so the table says what is true."""
    cmds = [c.text for _, c in all_commands()]
    stale = [c.pattern for c in COVERED if not any(re.fullmatch(c.pattern, cmd) for cmd in cmds)]
    assert not stale, f"COVERED entries that match no command of README.md or docs/: {stale}"


def test_marked_blocks_say_why():
    unrun = [c for _, c in all_commands() if c.unrun is not None]
    assert unrun and all(len(c.unrun) > 10 for c in unrun)


def test_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): "
                                            "move the reference into a page of docs/ and link it")


def test_no_page_points_at_sibling_folders():
    """A user has no `../shared` beside the checkout: a command or path into it would fail for them."""
    found = [f"{p.relative_to(REPO)}:{i}" for p in pages() for i, line in enumerate(p.read_text().splitlines(), 1)
             if "../shared" in line]
    assert not found, f"'../shared' in user docs: {found}"


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation but '-' and '_' dropped,
    spaces to '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # a '#' line in a code block is no heading
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)}


def relative_links(page: Path) -> list[tuple[str, str]]:
    """(target path or '', anchor or '') of each Markdown link or image that stays in the repository."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    out = []
    for m in re.finditer(r"\]\(([^)\s]+)\)", text):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        out.append((path, anchor))
    return out


def test_relative_links_lead_somewhere():
    broken = []
    for page in pages():
        for path, anchor in relative_links(page):
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {path} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: {path}#{anchor}: no such heading in {dest.relative_to(REPO)}")
    assert not broken, "broken links in the user docs:\n  " + "\n  ".join(broken)


def test_link_checker_reads_headings_and_links(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Running and resuming\n## Exit codes: 0, 143\n```bash\n# not a heading\n```\n"
                    "[a](other.md#x) ![b](img/a.png) [c](https://example.com) [d](#exit-codes-0-143)\n")
    assert anchors(page) == {"running-and-resuming", "exit-codes-0-143"}
    assert relative_links(page) == [("other.md", "x"), ("img/a.png", ""), ("", "exit-codes-0-143")]


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
