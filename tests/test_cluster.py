"""The emulated cluster (:mod:`cnn.cluster`): link profiles parsed and refused; hosts with
their own names, addresses and /dev/shm; a ``1gbe`` link that really caps TCP near 1 Gbit/s
(measured with a socket sender and receiver, tests/cluster_checks.py); a 2-host MPI training
run over a shaped link whose weights equal one host's, with the bytes on the link counters; a
4-host allreduce on a cluster made by ``python -m cnn cluster up`` in another process; a
``delay=`` link measured by round trips; and ``down`` (from another process, after a crash of
``up`` too) leaving no namespace, link, process or /dev/shm segment behind.

Everything but the parsing needs root and ``ip netns``: skipped with the reason otherwise."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cnn import cli
from cnn.cluster import EmulatedCluster, LinkProfile, unavailable
from parallel_helpers import max_abs_diff

HERE = Path(__file__).resolve().parent
CHECKS = HERE / "cluster_checks.py"
PY = sys.executable
MPIEXEC = Path(PY).parent / "mpiexec"
REASON = unavailable()
needs_netns = pytest.mark.skipif(REASON is not None,
                                 reason=f"network namespaces unavailable: {REASON}")
try:
    import mpi4py  # noqa: F401
    _NO_MPI = None if MPIEXEC.is_file() else f"no mpiexec at {MPIEXEC}"
except ImportError as err:
    _NO_MPI = f"mpi4py is not installed ({err})"
needs_mpi = pytest.mark.skipif(_NO_MPI is not None, reason=f"MPI unavailable: {_NO_MPI}")


def _env() -> dict:
    """This environment without an outer MPI job's launcher variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_"))}


def _cluster_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "cnn", "cluster", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env=env)


def _leftovers(cluster_id: str) -> dict:
    """What of cluster ``cluster_id`` is still on the machine."""
    prefix = f"pcnn-{cluster_id}-"
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {"namespaces": [line.split()[0] for line in netns.splitlines()
                           if line.startswith(prefix)],
            "shm": sorted(str(p) for p in Path("/dev/shm").glob(f"{prefix}*"))}


def _running(pid: int) -> bool:
    """True while process ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _root_links() -> set:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}


# ---- link profiles (no root needed) -------------------------------------------------------------
@pytest.mark.parametrize("text,rate,delay", [
    ("1gbe", 1e9, 0.0), ("10GbE", 10e9, 0.0), ("unshaped", None, 0.0),
    ("rate=2.5gbit", 2.5e9, 0.0), ("rate=800mbit,delay=100us", 800e6, 100e-6),
    ("delay=1.5ms", None, 1.5e-3), ("10gbe, delay=0.2ms", 10e9, 0.2e-3)])
def test_link_profiles(text, rate, delay):
    link = LinkProfile.parse(text)
    assert link.rate == rate and link.delay == pytest.approx(delay, rel=1e-12)


def test_a_shaped_link_is_a_token_bucket_of_the_rate():
    """1 Gbit/s is 125,000 bytes per ms: below 128 KiB, so the burst is 128 KiB (a whole
    64 KiB offload packet passes); the queue holds 20 ms at the rate (2,500,000 bytes) more."""
    assert LinkProfile.parse("1gbe").qdisc() == ["tbf", "rate", "1000000000bit", "burst",
                                                 "131072", "limit", str(131072 + 2_500_000)]
    # 10 Gbit/s: 1 ms is 1,250,000 bytes, the queue 25,000,000
    assert LinkProfile.parse("10gbe").qdisc()[3:] == ["burst", "1250000",
                                                      "limit", str(1_250_000 + 25_000_000)]
    assert LinkProfile.parse("unshaped").qdisc() is None


@pytest.mark.parametrize("text", ["5gbe", "rate=fast", "rate=2.5gb", "rate=1bit", "delay=5",
                                  "delay=2s", "1gbe,10gbe", "delay=1ms,delay=2ms", "", 1000])
def test_bad_link_profiles_are_refused_naming_the_value(text):
    with pytest.raises(ValueError, match=f"Received link={text!r}"):
        LinkProfile.parse(text)


@pytest.mark.parametrize("hosts", [1, 9, 2.5, True])
def test_bad_host_counts_are_refused_before_anything_is_made(tmp_path, hosts):
    with pytest.raises(ValueError, match=f"Received hosts={hosts!r}"):
        EmulatedCluster(hosts=hosts, link="1gbe", state_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_the_cli_refuses_a_bad_link(capsys, tmp_path):
    assert cli.main(["cluster", "up", "--link", "2gbe", "--state", str(tmp_path / "c")]) == 2
    assert "Received link='2gbe'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# ---- two hosts on a 1 Gbit/s link -----------------------------------------------------------------
@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    if REASON is not None:
        pytest.skip(f"network namespaces unavailable: {REASON}")
    with EmulatedCluster(hosts=2, link="1gbe",
                         state_dir=tmp_path_factory.mktemp("cluster") / "state") as cluster:
        yield cluster
    assert _leftovers(cluster.id) == {"namespaces": [], "shm": []}


@needs_netns
def test_hosts_have_their_own_name_address_and_shared_memory(two_hosts):
    mark = "/dev/shm/cluster-test-mark"
    seen = []
    for host in two_hosts.hosts:
        res = two_hosts.run(host.index, ["sh", "-c", f"hostname; ip -o -4 addr show eth0; "
                                                     f"ls /dev/shm; touch {mark}; ip route"])
        assert res.returncode == 0, res.stderr
        seen.append(res.stdout)
    for i, text in enumerate(seen):
        assert text.splitlines()[0] == f"node{i}"
        assert f"inet 10.99.0.{i + 1}/24" in text
        assert "default" not in text  # a route to the hosts' subnet and nowhere else
    assert "cluster-test-mark" not in seen[1]  # node0's /dev/shm is not node1's
    assert (two_hosts.hosts[0].shm / "cluster-test-mark").is_file()
    assert not os.path.exists(mark)  # nor the machine's


def _serve(cluster, host, args):
    """Start ``cluster_checks.py`` ``args`` on ``host`` and wait until it listens."""
    proc = cluster.popen(host, [PY, CHECKS, *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", proc.communicate()
    return proc


@needs_netns
def test_1gbe_caps_tcp_throughput_near_1_gbit(two_hosts):
    """16 MB from node0 to node1 over TCP: about 1 Gbit/s (unshaped, a veth pair carries
    several times that), and the bytes show on both hosts' counters."""
    nbytes, addr = 16_000_000, two_hosts.hosts[1].address
    before = two_hosts.counters()
    receiver = _serve(two_hosts, 1, ["recv", addr, "5201", nbytes])
    sender = two_hosts.run(0, [PY, CHECKS, "send", addr, "5201", nbytes], timeout=60)
    out, err = receiver.communicate(timeout=60)
    assert sender.returncode == 0 and receiver.returncode == 0, sender.stderr + err
    got = json.loads(out)
    assert got["bytes"] == nbytes
    gbit_per_s = got["bytes"] * 8 / got["seconds"] / 1e9
    assert 0.5 < gbit_per_s < 1.2, f"{gbit_per_s:.3f} Gbit/s on a 1gbe link"
    moved = {name: c - before[name] for name, c in two_hosts.counters().items()}
    assert moved["node0"].sent >= nbytes and moved["node1"].received >= nbytes


TRAIN = ["train", "--dataset", "blobs", "--limit", "120", "--test-limit", "40", "--epochs",
         "2", "--batch-size", "9", "--dtype", "float64", "--quiet"]


@needs_netns
@needs_mpi
def test_two_hosts_train_over_a_shaped_link_equal_one_host(two_hosts, tmp_path):
    """``mpiexec`` across the two hosts: the ranks run under the hosts' names, the weights
    equal the sequential run's in this process, and the gradients crossed the link. The run
    trains on 108 examples (the CLI holds 12 of the 120 out for validation) in batches of 9:
    2 epochs of 12 steps, each an allreduce of the float64 gradient buffer, which moves at
    least 2 (p - 1) / p of the buffer out of every rank and into it (all of it for p = 2)."""
    ref = tmp_path / "sequential.npz"
    assert cli.main(TRAIN + ["--strategy", "sequential", "--save", str(ref)]) == 0
    w = tmp_path / "w.npz"
    before = two_hosts.counters()
    res = two_hosts.run_mpiexec([PY, "-m", "cnn", *TRAIN, "--strategy", "mpi", "--save", w],
                                ranks=2, env=_env(), timeout=120, cwd=tmp_path)
    moved = {name: c - before[name] for name, c in two_hosts.counters().items()}
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("final test accuracy") == 1
    assert "hosts node0,node1" in res.stdout
    with np.load(w) as f, np.load(ref) as g:
        got = {k: f[k] for k in f.files if k != "__spec__"}
        want = {k: g[k] for k in g.files if k != "__spec__"}
    gradient_bytes = sum(v.size for v in got.values()) * 8
    for host in ("node0", "node1"):
        assert moved[host].sent > 2 * 12 * gradient_bytes
        assert moved[host].received > 2 * 12 * gradient_bytes
    assert max_abs_diff(got, want) < 1e-12


@needs_netns
@needs_mpi
def test_overlap_over_a_shaped_link_equals_one_host(two_hosts, tmp_path):
    """``--overlap`` across the two hosts (per-parameter buckets summed while backward runs,
    over the 1 Gbit/s link): the same weights as the sequential run, to 1e-12 in float64."""
    ref = tmp_path / "sequential.npz"
    assert cli.main(TRAIN + ["--strategy", "sequential", "--save", str(ref)]) == 0
    w = tmp_path / "w.npz"
    res = two_hosts.run_mpiexec([PY, "-m", "cnn", *TRAIN, "--strategy", "mpi", "--overlap",
                                 "--save", w], ranks=2, env=_env(), timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    with np.load(w) as f, np.load(ref) as g:
        assert max_abs_diff({k: f[k] for k in f.files if k != "__spec__"},
                            {k: g[k] for k in g.files if k != "__spec__"}) < 1e-12


@needs_netns
@needs_mpi
def test_fp16_compression_halves_the_bytes_on_the_link(two_hosts, tmp_path):
    """The same float32 run twice across the two hosts, with exact gradients and with
    ``--compression fp16``: 64 filters make the gradient 25,640 bytes, so its sums dwarf the
    frames' headers and the run's other messages, and each host's link sends and receives
    about half as many bytes (0.5 plus the loss-and-count allreduce and headers)."""
    train = [*TRAIN[:TRAIN.index("--dtype")], "--dtype", "float32", "--filters", "64",
             "--quiet", "--strategy", "mpi"]
    moved = {}
    for name, extra in (("exact", []), ("fp16", ["--compression", "fp16"])):
        before = two_hosts.counters()
        res = two_hosts.run_mpiexec([PY, "-m", "cnn", *train, *extra], ranks=2, env=_env(),
                                    timeout=120, cwd=tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        moved[name] = {h: c - before[h] for h, c in two_hosts.counters().items()}
    for host in ("node0", "node1"):
        for direction in ("sent", "received"):
            exact = getattr(moved["exact"][host], direction)
            half = getattr(moved["fp16"][host], direction)
            assert 0.45 < half / exact < 0.62, (host, direction, exact, half)


# ---- four hosts made by the command, torn down by it --------------------------------------------
@needs_netns
@needs_mpi
def test_four_hosts_allreduce_and_down_from_another_process(tmp_path):
    """``cluster up`` in one process; an allreduce over 4 ranks on the 4 hosts from this one
    (the sum equals the reference; every host sent and received at least 2 (p - 1) / p * n
    bytes, what any allreduce algorithm moves out of and into each of p ranks for n bytes); a
    process left running on a host and a segment
    left in a host's /dev/shm; ``cluster down`` in a third process removes them all."""
    state = tmp_path / "state"
    links_before = _root_links()
    res = _cluster_cli("up", "--hosts", 4, "--link", "10gbe", "--state", state)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "4 hosts on a bridge, every link 10 Gbit/s each way" in res.stdout
    cluster = EmulatedCluster.attach(state)
    try:
        n = 1 << 18  # 2 MiB of float64
        before = cluster.counters()
        out = tmp_path / "sum.npy"
        job = cluster.run_mpiexec([PY, CHECKS, "allreduce", n, out], ranks=4, env=_env(),
                                  timeout=120)
        moved = {name: c - before[name] for name, c in cluster.counters().items()}
        assert job.returncode == 0, job.stdout + job.stderr
        assert json.loads(job.stdout)["hosts"] == ["node0", "node1", "node2", "node3"]
        np.testing.assert_array_equal(np.load(out), 10.0 * np.arange(n))  # 1 + 2 + 3 + 4
        for host, c in moved.items():
            assert c.sent >= 2 * 3 / 4 * n * 8 and c.received >= 2 * 3 / 4 * n * 8, (host, c)

        status = _cluster_cli("status", "--json", "--state", state)
        assert status.returncode == 0, status.stderr
        record = json.loads(status.stdout)
        assert record["status"] == "up" and record["missing"] == []
        assert record["link"]["rate_bit_per_s"] == 10e9
        # what a crashed job leaves: a process on a host, a segment in a host's /dev/shm
        sleeper = cluster.popen(2, ["sleep", "600"])
        assert cluster.run(3, ["sh", "-c", "echo x > /dev/shm/mpich_shm_left_0"]).returncode == 0
        assert (cluster.hosts[3].shm / "mpich_shm_left_0").is_file()
    finally:
        res = _cluster_cli("down", "--state", state)
    assert res.returncode == 0, res.stdout + res.stderr
    assert sleeper.wait(timeout=30) == -signal.SIGKILL
    assert _leftovers(cluster.id) == {"namespaces": [], "shm": []}
    assert not state.exists()
    assert _root_links() == links_before
    assert _cluster_cli("down", "--state", state).stdout.strip() == f"no cluster in {state}"


# ---- a crash of `up` ----------------------------------------------------------------------------
FAKE_IP = """#!/bin/sh
# the real ip, except that the third host's link never gets made: `up` hangs there
case "$*" in
  *"link add p2 type veth"*) echo $$ > "%(mark)s"; exec sleep 120;;
esac
exec %(ip)s "$@"
"""


@needs_netns
def test_down_after_up_was_killed_midway_leaves_nothing(tmp_path):
    """``cluster up --hosts 4`` killed with SIGKILL while it makes the third host's link (the
    namespaces, the bridge, two shaped links and two /dev/shm folders made): ``cluster down``
    from another process removes all of it."""
    import shutil
    bin_dir, mark, state = tmp_path / "bin", tmp_path / "hung", tmp_path / "state"
    bin_dir.mkdir()
    (bin_dir / "ip").write_text(FAKE_IP % {"mark": mark, "ip": shutil.which("ip")})
    (bin_dir / "ip").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    links_before = _root_links()
    up = subprocess.Popen([PY, "-m", "cnn", "cluster", "up", "--hosts", "4", "--link", "1gbe",
                           "--state", str(state)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (mark.is_file() and mark.read_text().strip()):
            assert up.poll() is None, up.communicate()
            assert time.monotonic() < deadline, "up never reached the third link"
            time.sleep(0.05)
        record = json.loads((state / "state.json").read_text())
        made = _leftovers(record["id"])
        assert record["status"] == "creating"
        assert len(made["namespaces"]) == 5 and len(made["shm"]) == 2, made
        up.kill()
        up.wait()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        if mark.is_file() and mark.read_text().strip():
            try:
                os.kill(int(mark.read_text()), signal.SIGKILL)  # the hung `ip`
            except ProcessLookupError:
                pass
    res = _cluster_cli("down", "--state", state)
    assert res.returncode == 0, res.stdout + res.stderr
    assert _leftovers(record["id"]) == {"namespaces": [], "shm": []}
    assert not state.exists()
    assert _root_links() == links_before


# ---- latency ------------------------------------------------------------------------------------
@needs_netns
def test_a_delay_adds_twice_itself_to_the_round_trip(tmp_path):
    """``delay=2ms``: one-byte TCP round trips between two hosts take at least 4 ms (the delay
    line holds each frame 1 ms on each of the two links, each way) and the shortest not much
    more (the shortest: on a loaded machine the others wait for a core too); ``down`` ends
    the delay line."""
    delay = 2e-3
    with EmulatedCluster(hosts=2, link=f"1gbe,delay={delay * 1e3:g}ms",
                         state_dir=tmp_path / "state") as cluster:
        line = [int(p) for p in subprocess.run(
            ["ip", "netns", "pids", cluster.switch_namespace], capture_output=True,
            text=True).stdout.split()]
        assert len(line) == 1  # the delay line, alone in the switch's namespace
        addr = cluster.hosts[1].address
        server = _serve(cluster, 1, ["echo", addr, "5202"])
        res = cluster.run(0, [PY, CHECKS, "ping", addr, "5202", "50"], timeout=60)
        server.communicate(timeout=30)
        assert res.returncode == 0, res.stderr
        rtt = np.array(json.loads(res.stdout)["rtt"])
    assert 2 * delay <= rtt.min() < 2 * delay + 2e-3, \
        f"round trips {rtt.min() * 1e3:.2f} ms at the shortest, {np.median(rtt) * 1e3:.2f} median"
    assert not _running(line[0])
    assert _leftovers(cluster.id) == {"namespaces": [], "shm": []}


@needs_netns
@needs_mpi
def test_a_job_that_loses_a_host_goes_on_from_its_backup_on_the_others(tmp_path):
    """Issue 22: `train --strategy mpi --ranks 3 --hostfile H --backup-dir D --restarts 1`, one
    rank per host; a host is taken away mid-run (its processes killed, its namespace gone).
    The job ends, the launcher finds that host gone, relaunches on the two others from the
    last backup, and the run ends with the weights of the uninterrupted run (one process,
    the same sync algorithm: equal within the rounding of reordered sums)."""
    from cnn.backup import backup_files
    run = ["train", "--dataset", "blobs", "--limit", "3000", "--test-limit", "64",
           "--epochs", "3", "--quiet", "--seed", "3", "--dtype", "float64"]
    ref = subprocess.run([PY, "-m", "cnn", *run, "--save", tmp_path / "ref.npz"],
                         capture_output=True, text=True, timeout=300, cwd=HERE.parent,
                         env=_env())
    assert ref.returncode == 0, ref.stderr
    folder, save = tmp_path / "backups", tmp_path / "w.npz"
    with EmulatedCluster(hosts=3, link="unshaped", state_dir=tmp_path / "cluster") as c:
        job = c.popen(0, [PY, "-m", "cnn", *run, "--strategy", "mpi", "--ranks", "3",
                          "--hostfile", c.hostfile, "--backup-dir", folder, "--backup-every",
                          "10steps", "--restarts", "1", "--save", save],
                      env={**_env(), **c.environment()}, cwd=HERE.parent,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while not any(seq >= 2 for seq, _ in backup_files(folder)):
                assert job.poll() is None, job.communicate()
                assert time.monotonic() < deadline, "no backup within 120 s"
                time.sleep(0.02)
            gone = c.remove_host(2)
            out, err = job.communicate(timeout=300)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
    assert job.returncode == 0, err
    assert (f"gone: {gone.address}: relaunching it from its last backup on 2 ranks "
            f"(restart 1 of 1)") in err, err
    assert "resuming from" in err and "continuing with mpi ranks=2" in err, err
    with np.load(save) as got, np.load(tmp_path / "ref.npz") as want:
        assert max_abs_diff({k: got[k] for k in got.files if k != "__spec__"},
                            {k: want[k] for k in want.files if k != "__spec__"}) < 1e-10
