"""Offline means offline: a default job (``logger=wandb``, offline) phones no one and runs no git.

The job runs in a subprocess under ``strace -f``, because wandb's service (wandb-core) is a Go
binary whose connections a Python socket guard would not see. Where ``unshare -n`` works, the job
also runs in a network namespace of its own, so it must succeed with no network at all; connection
attempts still show up in the trace there (they just fail).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NETWORK_CALLS = "connect,sendto,sendmsg,sendmmsg"
# strace renders an inet address as sin_port=htons(P), sin_addr=inet_addr("A") or, for IPv6,
# sin6_port=htons(P), ..., inet_pton(AF_INET6, "A", &sin6_addr).
INET_ADDRESS = re.compile(r'sin6?_port=htons\((\d+)\).*?(?:inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)")')
EXECVE = re.compile(r'execve\("([^"]+)", \[([^\]]*)\]')


def _works(*command: str) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _no_network_prefix() -> list[str] | None:
    """``unshare -n`` (as root) or ``unshare -rn`` (user namespace), whichever this machine allows."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
        if _works(*prefix, "true"):
            return prefix
    return None


def phoning_home(trace: str) -> list[str]:
    """Trace lines that reach an inet address other than loopback, or any DNS server (port 53)."""
    found = []
    for line in trace.splitlines():
        if "AF_INET" not in line or not any(f"{call}(" in line for call in NETWORK_CALLS.split(",")):
            continue
        for port, ipv4, ipv6 in INET_ADDRESS.findall(line):
            address = ipaddress.ip_address(ipv4 or ipv6)
            mapped = getattr(address, "ipv4_mapped", None)
            loopback = address.is_loopback or (mapped is not None and mapped.is_loopback)
            if not loopback or int(port) == 53:
                found.append(line.strip())
    return found


def programs_run(trace: str) -> list[list[str]]:
    """argv of every program the job executed (successfully or not)."""
    return [re.findall(r'"([^"]*)"', argv) for _, argv in EXECVE.findall(trace)]


@pytest.fixture(scope="module")
def traced_job(tmp_path_factory):
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (apt-get install strace); it is what sees wandb-core's connections")
    if not _works("strace", "-f", "-o", os.devnull, "true"):
        pytest.skip("strace cannot ptrace here (e.g. a container without CAP_SYS_PTRACE or ptrace_scope=3)")
    tmp = tmp_path_factory.mktemp("offline")
    trace_file = tmp / "trace.txt"
    no_network = _no_network_prefix()
    # The job's own defaults decide: no WANDB_* switches from the caller (WANDB_SILENT only quietens).
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"WANDB_SILENT": "true", "KLOC_CACHE_DIR": str(ROOT / ".cache"), "PYTHONPATH": str(ROOT),
                "OMP_NUM_THREADS": "1"})
    job = [sys.executable, "-m", "pipeline.run", "stage=known", "dataset=known", "dataset.limit=4",
           "model=tiny_gpt2", f"paths.output_dir={tmp / 'out'}"]
    strace = ["strace", "-f", "-qq", "-s", "256", "-e", f"trace=execve,{NETWORK_CALLS}", "-o", str(trace_file)]
    done = subprocess.run([*(no_network or []), *strace, *job], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    return {"done": done, "trace": trace_file.read_text(), "no_network": no_network, "out": tmp / "out"}


def test_default_job_connects_to_nothing_but_loopback(traced_job):
    done = traced_job["done"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(traced_job["out"].rglob("offline-run-*")), "the default logger should be W&B offline"
    assert phoning_home(traced_job["trace"]) == []


def test_default_job_runs_no_git(traced_job):
    assert traced_job["done"].returncode == 0, traced_job["done"].stderr[-3000:]
    git = [argv for argv in programs_run(traced_job["trace"]) if Path(argv[0]).name == "git"]
    assert git == []


def test_default_job_succeeds_without_a_network(traced_job):
    if traced_job["no_network"] is None:
        pytest.skip("unshare -n / -rn is not permitted here, so the job ran with the machine's network")
    done = traced_job["done"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(traced_job["out"].rglob("results.json"))


def test_phoning_home_reads_strace_lines():
    lines = [
        '12 connect(7, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("10.255.255.53")}, 16) = 0',
        '12 connect(7, {sa_family=AF_INET, sin_port=htons(443), sin_addr=inet_addr("1.2.3.4")}, 16) = -1 ENETUNREACH',
        '12 connect(7, {sa_family=AF_INET6, sin6_port=htons(443), sin6_flowinfo=htonl(0), '
        'inet_pton(AF_INET6, "2001:db8::1", &sin6_addr), sin6_scope_id=0}, 28) = -1 ENETUNREACH',
        '12 connect(8, {sa_family=AF_INET, sin_port=htons(41000), sin_addr=inet_addr("127.0.0.1")}, 16) = 0',
        '12 connect(8, {sa_family=AF_INET6, sin6_port=htons(41000), sin6_flowinfo=htonl(0), '
        'inet_pton(AF_INET6, "::1", &sin6_addr), sin6_scope_id=0}, 28) = 0',
        '12 connect(8, {sa_family=AF_UNIX, sun_path="/tmp/wandb-1-2-3/socket"}, 41) = 0',
        '12 sendto(9, "q", 1, 0, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("127.0.0.53")}, 16) = 1',
    ]
    ports = [int(re.search(r"htons\((\d+)\)", hit).group(1)) for hit in phoning_home("\n".join(lines))]
    assert ports == [53, 443, 443, 53]  # the resolver, v4 and v6 hosts, a loopback resolver; not loopback 41000
    execs = '5 execve("/usr/bin/git", ["git", "config", "--get", "remote.origin.url"], 0x1 /* 3 vars */) = 0'
    assert programs_run(execs) == [["git", "config", "--get", "remote.origin.url"]]


def test_scoped_environ_restores_what_was_there(monkeypatch):
    from pipeline.loggers import scoped_environ

    monkeypatch.setenv("KLOC_TEST_SET", "before")
    monkeypatch.delenv("KLOC_TEST_UNSET", raising=False)
    with pytest.raises(RuntimeError), scoped_environ({"KLOC_TEST_SET": "during", "KLOC_TEST_UNSET": "during"}):
        assert os.environ["KLOC_TEST_SET"] == os.environ["KLOC_TEST_UNSET"] == "during"
        raise RuntimeError("restored even so")
    assert os.environ["KLOC_TEST_SET"] == "before" and "KLOC_TEST_UNSET" not in os.environ


def test_offline_logger_leaves_the_environment_as_it_was(tmp_path):
    from pipeline.loggers import WandbLogger

    def ours() -> dict[str, str]:  # wandb itself exports WANDB_SERVICE for child processes, as it always has
        return {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}

    before = ours()
    logger = WandbLogger(tmp_path, "knowledge-localization", None, "offline", "g", "known", "n", {"a": 1})
    logger.log_scalars({"x": 1.0})
    logger.close()
    assert ours() == before
    assert logger.run.settings.disable_git and logger.run.settings.x_disable_machine_info


def test_artifacts_and_wandb_logs_stay_in_the_job_dir(tmp_path, monkeypatch):
    """A copied job dir carries its artifacts: wandb stages nothing under the home directory."""
    from pipeline.loggers import WandbLogger

    home = tmp_path / "home"
    for name in ("HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME"):
        monkeypatch.setenv(name, str(home if name == "HOME" else home / name.lower()))
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "results.json").write_text('{"a": 1}')
    logger = WandbLogger(job_dir, "knowledge-localization", None, "offline", "g", "known", "artifacts", {})
    logger.log_artifact("results", [job_dir / "results.json"], "results")
    logger.close()
    staged = [p for p in (job_dir / "wandb").rglob("*") if p.is_file() and p.read_bytes() == b'{"a": 1}']
    assert staged, "the artifact's staged copy is in the job dir"
    assert not [p for p in home.rglob("*") if p.is_file()], "nothing of wandb's under the home dir"

