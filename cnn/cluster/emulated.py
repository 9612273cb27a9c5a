"""The emulated cluster: N hosts made of network namespaces on one machine, on one switch,
every link shaped to a :class:`~cnn.cluster.links.LinkProfile`.

Layout of cluster ``<id>`` (six hex digits, in every name it makes, so that two clusters never
collide and nothing else is touched)::

    namespace pcnn-<id>-sw:   bridge br0, ports p0 ... p<N-1>
    namespace pcnn-<id>-h<i>: eth0, address 10.99.0.<i+1>/24, host name node<i>
    /dev/shm/pcnn-<id>-h<i>:  host i's /dev/shm (see :mod:`cnn.cluster.launcher`)

Each host's link is a veth pair (``eth0`` to ``p<i>``), or with a delay a pair of TAP devices
joined by the delay line (:mod:`cnn.cluster.delay`), whose process lives in the switch's
namespace. A shaped link has a ``tbf`` on both ends (each direction). Nothing is made in the
machine's own namespace: the hosts reach each other and nothing else.

The state lives on disk, in the cluster's folder (default :data:`STATE_DIR`): ``state.json``
(written before anything is made, so that :func:`down` from any process, after a crash of the
one that ran ``up`` too, finds what to remove), the hostfile and the scripts of
:mod:`cnn.cluster.launcher`. One cluster per folder.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..checks import check_int
from ..files import atomic_write, read_structured
from . import launcher
from .links import LinkProfile

#: the default state folder (``python -m cnn cluster ... --state DIR`` gives another)
STATE_DIR = Path("/run/parallel-cnn/cluster")
STATE_FILE = "state.json"
#: the files ``up`` writes into the state folder besides :data:`STATE_FILE`
FILES = ("hostfile", "enter", "ssh", "mpiexec", "delay.log")
#: the empty folder in the state folder that the hosts' commands bind /dev/shm at
SHM_ROOT = "shm-root"
MIN_HOSTS, MAX_HOSTS = 2, 8
#: every name a cluster makes starts with this and its id
PREFIX = "pcnn-"
#: the hosts' subnet: host i is <SUBNET>.<i+1>
SUBNET = "10.99.0"
SWITCH_BRIDGE = "br0"
HOST_LINK = "eth0"
#: seconds an ``ip``/``tc`` command may take, and the delay line to start
COMMAND_TIMEOUT = 30


@dataclass(frozen=True)
class Host:
    """One emulated host: its ``index``, host ``name``, ``address``, network ``namespace``,
    the switch ``port`` its link ends in, and ``shm``, the folder that is its /dev/shm."""
    index: int
    name: str
    address: str
    namespace: str
    port: str
    shm: Path


@dataclass(frozen=True)
class LinkCounters:
    """Bytes a host's ``eth0`` has ``sent`` and ``received`` (Ethernet frames, headers in);
    ``after - before`` gives what crossed in between."""
    sent: int
    received: int

    def __sub__(self, other: "LinkCounters") -> "LinkCounters":
        return LinkCounters(self.sent - other.sent, self.received - other.received)


def _run(*cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd``; with ``check``, an ``OSError`` naming it and its error output if it fails."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                         **kwargs)
    if check and res.returncode != 0:
        raise OSError(f"`{' '.join(cmd)}` failed with exit status {res.returncode}: "
                      f"{(res.stderr or res.stdout).strip()}")
    return res


def unavailable() -> str | None:
    """Why an emulated cluster cannot be made here, or None: not root, a missing command
    (``ip``, ``tc``, ``unshare``, ``hostname``, ``mount``), or ``ip netns add`` refused."""
    if os.geteuid() != 0:
        return (f"not root (uid {os.geteuid()}): network namespaces need CAP_NET_ADMIN and "
                f"CAP_SYS_ADMIN")
    for tool in ("ip", "tc", "unshare", "hostname", "mount", "mountpoint"):
        if shutil.which(tool) is None:
            return f"no {tool} command on PATH"
    if not os.path.isdir("/dev/shm"):
        return "no /dev/shm"
    probe = f"{PREFIX}probe-{os.getpid()}"
    res = _run("ip", "netns", "add", probe, check=False)
    if res.returncode != 0:
        return f"`ip netns add` failed: {res.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


def _namespaces() -> list[str]:
    """The network namespaces ``ip netns`` knows."""
    res = _run("ip", "netns", "list", check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


class EmulatedCluster:
    """``hosts`` network-namespace hosts (2 to 8) on a bridge, every link shaped to ``link``
    (a :class:`LinkProfile` or its text: ``1gbe``, ``10gbe``, ``unshaped``,
    ``rate=2.5gbit``, ``1gbe,delay=100us``), its state in ``state_dir``.

    A context manager: ``with EmulatedCluster(hosts=4, link="1gbe", state_dir=d) as c:``
    makes it and tears it down on the way out, an exception included. :meth:`attach` gives
    one that another process made (``python -m cnn cluster up``).

    Arguments are checked here, before anything is made."""

    def __init__(self, hosts: int = 2, link: "str | LinkProfile" = "1gbe",
                 state_dir: "str | os.PathLike" = STATE_DIR):
        self.n_hosts = check_int("EmulatedCluster", "hosts", hosts, low=MIN_HOSTS,
                                 high=MAX_HOSTS)
        self.link = LinkProfile.parse(link)
        self.state_dir = Path(state_dir).absolute()
        self.id: str | None = None
        self.hosts: list[Host] = []

    # ---- names and files ------------------------------------------------------------------
    def _name(self, suffix: str) -> str:
        return f"{PREFIX}{self.id}-{suffix}"

    @property
    def switch_namespace(self) -> str:
        return self._name("sw")

    @property
    def hostfile(self) -> Path:
        return self.state_dir / "hostfile"

    @property
    def enter(self) -> Path:
        """The ``enter HOST COMMAND...`` script (:mod:`cnn.cluster.launcher`)."""
        return self.state_dir / "enter"

    @property
    def shm_root(self) -> Path:
        """Where a command on a host sees the machine's /dev/shm (an empty folder outside)."""
        return self.state_dir / SHM_ROOT

    @property
    def ssh(self) -> Path:
        """The ``ssh`` stand-in for Hydra."""
        return self.state_dir / "ssh"

    @property
    def mpiexec(self) -> Path:
        """The ``mpiexec [OPTIONS] COMMAND...`` script that runs a job across the hosts."""
        return self.state_dir / "mpiexec"

    def _plan(self) -> list[Host]:
        return [Host(i, f"node{i}", f"{SUBNET}.{i + 1}", self._name(f"h{i}"), f"p{i}",
                     Path("/dev/shm") / self._name(f"h{i}")) for i in range(self.n_hosts)]

    def _state(self, status: str) -> dict:
        return {"id": self.id, "status": status, "pid": os.getpid(), "created": time.time(),
                "hosts": [{"name": h.name, "address": h.address, "namespace": h.namespace,
                           "port": h.port, "shm": str(h.shm)} for h in self.hosts],
                "switch_namespace": self.switch_namespace, "link": self.link.to_dict(),
                "link_spec": self.link.name}

    @classmethod
    def attach(cls, state_dir: "str | os.PathLike" = STATE_DIR) -> "EmulatedCluster":
        """The cluster that is up in ``state_dir`` (made by this or another process);
        ``FileNotFoundError`` when there is none, ``ValueError`` when it is still being made."""
        state_dir = Path(state_dir).absolute()
        state = read_structured(state_dir / STATE_FILE, "emulated cluster state")
        if state.get("status") != "up":
            raise ValueError(f"the cluster in {state_dir} is {state.get('status')!r}, not up "
                             f"(its `up` was interrupted?): `python -m cnn cluster down "
                             f"--state {state_dir}` removes what it made")
        cluster = cls(len(state["hosts"]), state["link_spec"], state_dir)
        cluster.id = state["id"]
        cluster.hosts = cluster._plan()
        return cluster

    # ---- making and removing --------------------------------------------------------------
    def up(self) -> "EmulatedCluster":
        """Make the cluster; on any failure (an interrupt too) remove what was made and raise.
        ``FileExistsError`` when a cluster is already in ``state_dir``."""
        reason = unavailable()
        if reason:
            raise PermissionError(f"cannot make an emulated cluster here: {reason}")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state_path = self.state_dir / STATE_FILE
        self.id = os.urandom(3).hex()
        self.hosts = self._plan()
        # claim the folder with the whole first record at once (a hard link fails where a
        # state file exists): `down` finds the id there whenever anything has been made
        claim = atomic_write(self.state_dir / f".{STATE_FILE}.{os.getpid()}.claim",
                             json.dumps(self._state("creating"), indent=1))
        try:
            os.link(claim, state_path)
        except FileExistsError:
            self.id, self.hosts = None, []
            raise FileExistsError(
                f"a cluster is already in {self.state_dir} ({_describe_state(state_path)}): "
                f"`python -m cnn cluster down --state {self.state_dir}` first, or give "
                f"another state folder") from None
        finally:
            claim.unlink()
        try:
            self._make()
            atomic_write(state_path, json.dumps(self._state("up"), indent=1))
        except BaseException:
            down(self.state_dir)
            raise
        return self

    def _make(self) -> None:
        sw = self.switch_namespace
        for ns in (sw, *(h.namespace for h in self.hosts)):
            _run("ip", "netns", "add", ns)
            # no IPv6: its neighbour discovery would add stray bytes to the link counters
            _run("ip", "netns", "exec", ns, "sh", "-c",
                 "for f in /proc/sys/net/ipv6/conf/*/disable_ipv6; do "
                 "[ -e \"$f\" ] && echo 1 > \"$f\"; done; true")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", sw, "link", "add", SWITCH_BRIDGE, "type", "bridge")
        _run("ip", "-n", sw, "link", "set", SWITCH_BRIDGE, "up")
        if self.link.delay:
            self._start_delay_line()
        for h in self.hosts:
            if self.link.delay:  # the delay line made h<i> and p<i> in the switch's namespace
                _run("ip", "-n", sw, "link", "set", f"h{h.index}", "netns", h.namespace)
                _run("ip", "-n", h.namespace, "link", "set", f"h{h.index}", "name", HOST_LINK)
            else:
                _run("ip", "-n", sw, "link", "add", h.port, "type", "veth", "peer", "name",
                     HOST_LINK, "netns", h.namespace)
            _run("ip", "-n", sw, "link", "set", h.port, "master", SWITCH_BRIDGE)
            _run("ip", "-n", sw, "link", "set", h.port, "up")
            _run("ip", "-n", h.namespace, "addr", "add", f"{h.address}/24", "dev", HOST_LINK)
            _run("ip", "-n", h.namespace, "link", "set", HOST_LINK, "up")
            qdisc = self.link.qdisc()
            if qdisc:  # each end shapes what leaves it: eth0 the host's sending, p<i> its receiving
                _run("tc", "-n", h.namespace, "qdisc", "add", "dev", HOST_LINK, "root", *qdisc)
                _run("tc", "-n", sw, "qdisc", "add", "dev", h.port, "root", *qdisc)
            h.shm.mkdir(mode=0o1777)
        self._write_scripts()

    def _start_delay_line(self) -> None:
        """Start the delay line in the switch's namespace, holding each frame half the link
        delay on each of the two links it crosses; return once its devices exist."""
        names = [name for h in self.hosts for name in (f"h{h.index}", h.port)]
        command = ["ip", "netns", "exec", self.switch_namespace, sys.executable, "-m",
                   "cnn.cluster.delay", "--delay", repr(self.link.delay / 2), *names]
        log_path = self.state_dir / "delay.log"
        # started by a shell that exits at once: the delay line outlives `up` as nobody's
        # child (`down` kills it with the other processes in the cluster's namespaces)
        with open(log_path, "w") as log:
            starter = subprocess.Popen(["/bin/sh", "-c", '"$@" &', "sh", *command],
                                       stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=log, text=True)
        with starter:
            starter.wait(COMMAND_TIMEOUT)
            # "ready" once the devices exist; "" if it died first
            readable, _, _ = select.select([starter.stdout], [], [], COMMAND_TIMEOUT)
            line = starter.stdout.readline() if readable else ""
        if line.strip() != "ready":
            raise OSError(f"the delay line did not start: "
                          f"{log_path.read_text().strip()[-2000:] or 'no output'}")

    def _write_scripts(self) -> None:
        self.shm_root.mkdir()
        files = {self.hostfile: launcher.hostfile_text(self.hosts),
                 self.enter: launcher.enter_script(self.id, self.hosts, self.shm_root),
                 self.ssh: launcher.ssh_script(self.id, self.enter)}
        from ..parallel.launch import find_mpiexec
        try:
            files[self.mpiexec] = launcher.mpiexec_script(
                self.id, self.mpiexec_command([], mpiexec=find_mpiexec()))
        except FileNotFoundError:
            pass  # no MPI here: the cluster still runs commands, no MPI job
        for path, text in files.items():
            atomic_write(path, text)
            if path != self.hostfile:
                path.chmod(0o755)

    def down(self) -> list[str]:
        """Tear the cluster down (:func:`down` of its state folder)."""
        return down(self.state_dir)

    def __enter__(self) -> "EmulatedCluster":
        if self.id is None:
            self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    # ---- using it ------------------------------------------------------------------------
    def host(self, which: "int | str") -> Host:
        """A host by index, name or address."""
        for h in self.hosts:
            if which in (h.index, h.name, h.address):
                return h
        raise ValueError(f"cluster {self.id} has no host {which!r} (hosts: "
                         f"{', '.join(h.name for h in self.hosts)})")

    def command(self, host: "int | str", argv: list[str]) -> list[str]:
        """The command line that runs ``argv`` on ``host`` (index, name or address)."""
        return [str(self.enter), self.host(host).name, *map(str, argv)]

    def run(self, host: "int | str", argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """``subprocess.run`` of ``argv`` on ``host`` (text output captured unless told)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(host, argv), **kwargs)

    def popen(self, host: "int | str", argv: list[str], **kwargs) -> subprocess.Popen:
        """``subprocess.Popen`` of ``argv`` on ``host``."""
        return subprocess.Popen(self.command(host, argv), **kwargs)

    def mpiexec_command(self, argv: list[str], ranks: int | None = None,
                        mpiexec: str | None = None) -> list[str]:
        """The command line that runs ``argv`` on ``ranks`` MPI ranks (default: one per
        host), rank ``r`` on host ``r % hosts``, with ``mpiexec`` (default: the venv's)
        started on the first host."""
        if mpiexec is None:
            from ..parallel.launch import find_mpiexec
            mpiexec = find_mpiexec()
        options = launcher.mpiexec_options(self.hostfile, self.ssh, self.hosts[0].address)
        ranks_option = [] if ranks is None else ["-n", str(check_int(None, "ranks", ranks))]
        return self.command(0, [mpiexec, *options, *ranks_option, *argv])

    def run_mpiexec(self, argv: list[str], ranks: int | None = None, **kwargs
                    ) -> subprocess.CompletedProcess:
        """``subprocess.run`` of :meth:`mpiexec_command` (text output captured unless told)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.mpiexec_command(argv, ranks), **kwargs)

    def environment(self) -> dict[str, str]:
        """The environment that makes an ``mpiexec`` started *on a host* (by a program: ``train
        --ranks N --hostfile H`` with :attr:`hostfile`) reach the others as
        :meth:`mpiexec_command` does (:func:`cnn.cluster.launcher.hydra_environment`)."""
        return launcher.hydra_environment(self.ssh, HOST_LINK)

    def remove_host(self, which: "int | str") -> Host:
        """Take a host away, as a machine that fails does: every process on it is killed
        (SIGKILL) and its network namespace, and so its link, deleted, so that nothing reaches
        it any more (``enter`` refuses it). :meth:`down` removes the rest as usual."""
        host = self.host(which)
        _kill_processes([host.namespace], f"host {host.name}")
        _run("ip", "netns", "del", host.namespace)
        return host

    def counters(self) -> dict[str, LinkCounters]:
        """Host name -> bytes its ``eth0`` has sent and received so far."""
        out = {}
        for h in self.hosts:
            res = _run("ip", "-n", h.namespace, "-j", "-s", "link", "show", "dev", HOST_LINK)
            stats = json.loads(res.stdout)[0]["stats64"]
            out[h.name] = LinkCounters(int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"]))
        return out

    def status(self) -> dict:
        """The state file's record, with ``missing`` (namespaces that should exist and do
        not) and each host's counters when all are there."""
        state = read_structured(self.state_dir / STATE_FILE, "emulated cluster state")
        present = set(_namespaces())
        wanted = [state["switch_namespace"], *(h["namespace"] for h in state["hosts"])]
        state["missing"] = [ns for ns in wanted if ns not in present]
        if not state["missing"] and state["status"] == "up":
            counters = self.counters()
            for h in state["hosts"]:
                h["sent_bytes"] = counters[h["name"]].sent
                h["received_bytes"] = counters[h["name"]].received
        return state


def _describe_state(state_path: Path) -> str:
    try:
        state = json.loads(state_path.read_text())
        return (f"cluster {state['id']}, {len(state['hosts'])} hosts, "
                f"{state['status']}")
    except (OSError, ValueError, KeyError, TypeError):
        return f"an unreadable {state_path.name}"


def _running(pid: int) -> bool:
    """True until process ``pid`` has ended (a zombie, ended but not yet reaped, has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _pids(namespace: str) -> list[int]:
    res = _run("ip", "netns", "pids", namespace, check=False)
    return [int(p) for p in res.stdout.split() if p.isdigit()]


def _kill_processes(namespaces: list[str], what: str) -> None:
    """SIGKILL every process in ``namespaces`` and wait until all have ended."""
    killed: set[int] = set()
    deadline = time.monotonic() + COMMAND_TIMEOUT
    while True:
        pids = {pid for ns in namespaces for pid in _pids(ns)}
        # `ip netns pids` stops listing a process as it starts to exit: wait for its end
        if not pids and not any(_running(pid) for pid in killed):
            return
        if time.monotonic() > deadline:
            raise OSError(f"processes {sorted(pids | killed)} in {what} survived SIGKILL for "
                          f"{COMMAND_TIMEOUT} s")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed |= pids
        time.sleep(0.02)


def down(state_dir: "str | os.PathLike" = STATE_DIR) -> list[str]:
    """Remove the cluster whose state is in ``state_dir``, whole or half made: every process
    still running in its namespaces (SIGKILL; the delay line among them), its namespaces
    (and so its links and bridge), its /dev/shm folders (and so every segment its jobs
    left), its files, and last its state file. Returns what it removed (namespaces and
    folders); nothing when there is no state file. Safe to run again after a failure."""
    state_dir = Path(state_dir).absolute()
    state_path = state_dir / STATE_FILE
    if not state_path.is_file():
        return []
    try:
        cluster_id = json.loads(state_path.read_text())["id"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{state_path}: not an emulated cluster's state (no id); remove it "
                         f"by hand if nothing of a cluster is left") from None
    if not (isinstance(cluster_id, str) and len(cluster_id) == 6
            and all(c in "0123456789abcdef" for c in cluster_id)):
        raise ValueError(f"{state_path}: the cluster id must be six hex digits. Received "
                         f"id={cluster_id!r}")
    prefix = f"{PREFIX}{cluster_id}-"
    namespaces = [ns for ns in _namespaces() if ns.startswith(prefix)]
    removed = []
    # processes first: a namespace outlives `ip netns del` while a process runs in it
    _kill_processes(namespaces, f"cluster {cluster_id}")
    for ns in namespaces:
        _run("ip", "netns", "del", ns)
        removed.append(ns)
    for folder in sorted(Path("/dev/shm").glob(f"{prefix}*")):
        shutil.rmtree(folder)
        removed.append(str(folder))
    for name in FILES:
        (state_dir / name).unlink(missing_ok=True)
    if (state_dir / SHM_ROOT).is_dir():
        (state_dir / SHM_ROOT).rmdir()
    state_path.unlink()
    for folder in (state_dir, STATE_DIR.parent) if state_dir == STATE_DIR else (state_dir,):
        try:
            folder.rmdir()  # only when nothing else is in it
        except OSError:
            break
    return removed
