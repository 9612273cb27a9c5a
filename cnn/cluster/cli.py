"""The ``cluster`` command: ``python -m cnn cluster {up,down,status}``."""
from __future__ import annotations

import argparse
import json

from .emulated import MAX_HOSTS, MIN_HOSTS, STATE_DIR, EmulatedCluster, down
from .links import USAGE

EPILOG = f"""examples:
  python -m cnn cluster up --hosts 4 --link 1gbe
  {STATE_DIR}/mpiexec -n 4 python -m cnn train --strategy mpi
  {STATE_DIR}/enter node1 hostname
  python -m cnn cluster status
  python -m cnn cluster down

link profiles: {USAGE}"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``cluster`` command's actions and options."""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("action", choices=["up", "down", "status"],
                   help="up: make the hosts and links; down: remove everything of the cluster "
                        "(also a half-made one); status: hosts, link and byte counters")
    p.add_argument("--hosts", type=int, default=2,
                   help=f"up: number of hosts, {MIN_HOSTS} to {MAX_HOSTS} (default 2)")
    p.add_argument("--link", default="1gbe",
                   help="up: every host's link: 1gbe (default), 10gbe, 25gbe, unshaped or "
                        "rate=<number><unit> (rate=2.5gbit), optionally with ,delay=<time> "
                        "(1gbe,delay=100us)")
    p.add_argument("--state", default=str(STATE_DIR),
                   help="the cluster's folder: state file, hostfile, scripts (default "
                        "%(default)s; one cluster per folder)")
    p.add_argument("--json", action="store_true", help="status: the state as JSON")


def _print_cluster(cluster: EmulatedCluster, state: dict) -> None:
    print(f"cluster {cluster.id} {state['status']}: {len(cluster.hosts)} hosts on a bridge, "
          f"every link {cluster.link.describe()}")
    for h in state["hosts"]:
        counted = (f"  sent {h['sent_bytes']:,} B, received {h['received_bytes']:,} B"
                   if "sent_bytes" in h else "")
        print(f"  {h['name']:<6} {h['address']:<12} netns {h['namespace']}{counted}")
    if state.get("missing"):
        print(f"missing namespaces: {', '.join(state['missing'])} (run down, then up)")
    print(f"hostfile:       {cluster.hostfile}")
    print(f"run on a host:  {cluster.enter} node1 hostname")
    if cluster.mpiexec.is_file():
        print(f"MPI job:        {cluster.mpiexec} -n {len(cluster.hosts)} python -m cnn ...")
    print(f"tear down:      python -m cnn cluster down --state {cluster.state_dir}")


def command(args) -> int:
    """Run the ``cluster`` command from parsed arguments."""
    if args.action == "up":
        cluster = EmulatedCluster(args.hosts, args.link, args.state).up()
        _print_cluster(cluster, cluster.status())
        return 0
    if args.action == "down":
        removed = down(args.state)
        if not removed:
            print(f"no cluster in {args.state}")
            return 0
        folders = [r for r in removed if r.startswith("/")]
        print(f"removed {len(removed) - len(folders)} namespaces (their links and bridge with "
              f"them) and {len(folders)} /dev/shm folders")
        return 0
    try:
        cluster = EmulatedCluster.attach(args.state)
    except FileNotFoundError:
        print(f"no cluster in {args.state}")
        return 1
    state = cluster.status()
    if args.json:
        print(json.dumps(state, indent=1))
    else:
        _print_cluster(cluster, state)
    return 0 if not state["missing"] else 1
