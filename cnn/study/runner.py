"""The parent: run every run of a grid in its own child process, record, resume.

Isolation
---------
Every run executes in a fresh Python interpreter (:mod:`cnn.study.child`), started the way
the run's path says (:meth:`cnn.paths.TrainingPath.command` and ``child_env``: environment
variables set before the interpreter starts, or ``mpiexec``). The child trains, writes a JSON
result and exits; it dies with the study (see :mod:`cnn.study.child`).

JIT compilation: Numba caches compiled kernels on disk, so left alone the first Numba run of a
study would pay the compile and later runs would not. Instead every study invocation points
NUMBA_CACHE_DIR at its own empty folder and, before the first run of each JIT backend and
dtype, a separate warm-up process compiles that backend's kernels into it (timed: the
``cold_compile_time`` column). Every measured run then starts from the same warm disk cache,
whatever its place in the order; its own ``compile_time`` is recorded apart from the epochs.
The folder is deleted when the study ends; the temporary and JIT-cache folders of studies that
were killed (their names carry the study's pid and start time) are deleted when the next study
starts.

So no run's JIT, thread pools, BLAS state, GPU context or heap carries into the next, and no
run depends on what ran before it. The parent enforces the per-run ``timeout`` (the child is
killed) and records the run as failed when the child raises, exits without a result (a crash)
or times out, and as diverged when its training diverged; the study goes on with the next run.

Storage, resuming, interruption, concurrency
--------------------------------------------
All rows live in one pickled DataFrame (``out``; :mod:`cnn.results`), rewritten atomically and
fsynced after every run, before the next starts, so a crash, a kill, a power cut or Ctrl-C
keeps every finished run (the interrupted run is simply not recorded). Running the same study
again resumes: runs whose ``run_key`` is already "ok" (or "diverged") in the file are skipped;
failed runs are retried (their old rows replaced) unless ``retry_failed=False``. Rows of other
grids already in the file are kept, so one file can grow over several studies. A study holds a
lock on ``out`` for its whole duration: a second study on the same file refuses at once (or
waits, ``wait=``/``--wait``) with a message naming the first.

Resuming inside a run
---------------------
A run trained by :func:`cnn.train.fit` keeps backups (:mod:`cnn.backup`) in
``.<out name>.backups/<run_key>/`` beside the results file, written after each epoch, outside
the epoch's timed part. When its process is killed (a signal: ``kill -9``, the OOM killer) the
study starts it again at once (:data:`RESTARTS` times), and it continues from its last backup
instead of from zero; a study killed and started again does the same for the run it was in.
The epochs trained by a process that resumed are marked ``resumed`` in the results (their
timings come from a process that restarted), and the analysis keeps them out of the
throughput figures. The backups go once the run is recorded ok or diverged.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Callable

from .. import paths as P
from ..backup import backup_files
from ..checks import check_int
from ..files import process_alive, read_structured
from ..results import (CONFIG_FIELDS, DEFAULT_RESULTS, EPOCH_FIELDS, MACHINE_COLUMNS,
                       ResultsLock, check_out_path, done_keys, load_results, save_results, typed)
from .child import source_hash
from .grid import (DEFAULT_TIMEOUT, SYNTHETIC, check_timeout, expand_grid, plan_order,
                   unavailable)
from .run import Run

TEMP_PREFIX = "cnn-study-"
#: times a run whose process died (a signal) is started again from its backup, in one study
RESTARTS = 1


# ---- temporary folders, and those of dead studies -----------------------------------------------
def _proc_start(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot (Linux), "" elsewhere: with
    the pid it tells a live study from a new process that reuses a dead study's pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


@lru_cache(maxsize=1)
def _owner_tag() -> str:
    pid = os.getpid()
    return f"{pid}-{_proc_start(pid) or 0}"


def study_tempdir(kind: str) -> Path:
    """A new temporary folder owned by this study: ``cnn-study-<pid>-<start>-<kind>-*``."""
    return Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{_owner_tag()}-{kind}-"))


_TEMP_NAME = re.compile(rf"^{TEMP_PREFIX}(\d+)-(\d+)-[a-z]+-")


def _alive(pid: int, start: str) -> bool:
    if not process_alive(pid):
        return False
    now = _proc_start(pid)
    return not (now and start not in ("", "0") and now != start)


def clean_stale_tempdirs(root=None) -> list[Path]:
    """Delete the temporary and JIT-cache folders of studies that are no longer running (a
    study killed with ``kill -9`` cannot delete its own). Returns the folders removed."""
    root = Path(root or tempfile.gettempdir())
    removed = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for d in entries:
        m = _TEMP_NAME.match(d.name)
        if not m or not d.is_dir():
            continue
        pid, start = int(m.group(1)), m.group(2)
        if pid == os.getpid() or _alive(pid, start):
            continue
        if m.group(0).endswith("-cluster-"):  # a killed study's emulated cluster: take it down
            from ..cluster import down
            try:
                down(d)
            except (OSError, ValueError):
                pass
        shutil.rmtree(d, ignore_errors=True)
        if not d.exists():
            removed.append(d)
    return removed


# ---- launching a child ----------------------------------------------------------------------------
def _package_root() -> str:
    return str(Path(__file__).resolve().parent.parent.parent)


def child_env(run: Run | None = None, numba_cache: Path | None = None) -> dict:
    """The environment of a child process, complete before its interpreter starts (numba and
    TensorFlow read these variables at import): the study's, and ``run``'s path's own
    variables (registry) when it trains a run."""
    env = dict(os.environ)
    if numba_cache is not None:
        env["NUMBA_CACHE_DIR"] = str(numba_cache)  # the study's own JIT cache
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    if run is not None:
        env.update(run.entry.child_env(run))
        if run.cuda_simulator:
            env["NUMBA_ENABLE_CUDASIM"] = "1"
    return env


def child_command(run: Run, *args: str, mpiexec: str | None = None) -> list[str]:
    argv = [sys.executable, "-m", "cnn.study.child", *args, "--parent-pid", str(os.getpid())]
    return run.entry.command(run, argv, mpiexec)


# ---- emulated clusters ------------------------------------------------------------------------------
def check_clusters(runs: list[Run]) -> None:
    """Refuse, before any run, a grid whose runs cross an emulated cluster (the ``link`` axis)
    where one cannot be made (not root, no network namespaces, ``ip``/``tc`` missing): a
    ``ValueError`` naming the runs, their links and the reason."""
    links = sorted({r.link for r in runs if r.link})
    if not links:
        return
    from ..cluster import unavailable as cluster_unavailable
    reason = cluster_unavailable()
    if reason:
        n = sum(1 for r in runs if r.link)
        raise ValueError(f"{n} run(s) of this grid run MPI ranks across an emulated cluster "
                         f"(link {', '.join(links)}), which cannot be made here: {reason}. Run "
                         f"the study as root where network namespaces are allowed, or leave "
                         f"the 'link' axis out of the grid")


class Clusters:
    """The emulated clusters of a study's runs across links: one per link profile, made when
    its first run starts, with as many hosts as that profile's runs have ranks at most (a run
    of ``p`` ranks uses the first ``p`` hosts), each in its own temporary state folder, and
    torn down by :meth:`close` (the study's end, an interrupt too)."""

    def __init__(self, runs: list[Run]):
        self.hosts: dict[str, int] = {}
        for r in runs:
            if r.link:
                self.hosts[r.link] = max(self.hosts.get(r.link, 0), int(r.threads))
        self.made: dict = {}

    def mpiexec(self, run: Run, say=print) -> str | None:
        """The ``mpiexec`` that spreads ``run``'s ranks over its link's cluster (made now if it
        is not up yet); None for a run on this host."""
        if not run.link:
            return None
        cluster = self.made.get(run.link)
        if cluster is None:
            from ..cluster import EmulatedCluster
            cluster = EmulatedCluster(self.hosts[run.link], run.link,
                                      study_tempdir("cluster")).up()
            self.made[run.link] = cluster
            say(f"(emulated cluster up: {cluster.n_hosts} hosts, every link "
                f"{cluster.link.describe()}) ", end="", flush=True)
        if not cluster.mpiexec.is_file():
            raise FileNotFoundError(f"the emulated cluster in {cluster.state_dir} has no "
                                    f"mpiexec (no MPI installed?)")
        return str(cluster.mpiexec)

    def close(self) -> None:
        for cluster in self.made.values():
            cluster.down()
            shutil.rmtree(cluster.state_dir, ignore_errors=True)
        self.made.clear()


def _tail(text: str, lines: int = 200) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])


def launch(run: Run, data_root, download: bool, jit_cache: Path | None = None,
           backup_dir: Path | None = None, mpiexec: str | None = None
           ) -> tuple[dict, float, str]:
    """Train one run in a child (with its backups in ``backup_dir``, when given; started by
    ``mpiexec`` when given: an emulated cluster's); returns (result, wall seconds, child
    output tail). A child killed by a signal gives a failed result whose ``killed_by`` names
    the signal."""
    tmp = study_tempdir("run")
    try:
        cfg_path, res_path = tmp / "config.json", tmp / "result.json"
        root = None if data_root is None else str(data_root)
        cfg_path.write_text(json.dumps({"config": dict(run), "download": download,
                                        "data_root": root,
                                        "backup_dir": None if backup_dir is None
                                        else str(backup_dir)}))
        cmd = child_command(run, "--run-json", str(cfg_path), "--result", str(res_path),
                            mpiexec=mpiexec)
        timeout = run.timeout
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=child_env(run, numba_cache=jit_cache),
                                  cwd=_package_root(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=timeout)
            output, code = proc.stdout or "", proc.returncode
        except subprocess.TimeoutExpired as err:  # run() has killed the child
            wall = time.perf_counter() - t
            out = err.output or ""
            out = out.decode(errors="replace") if isinstance(out, bytes) else out
            return ({"status": "failed",
                     "error": f"TimeoutError: the run exceeded its timeout of {timeout:g} s "
                              f"and was killed"}, wall, _tail(out))
        wall = time.perf_counter() - t
        if code and run.entry.launch == "mpiexec":
            # an MPI job ended by MPI_Abort or a killed rank leaves MPICH's /dev/shm segments
            from ..parallel.launch import remove_orphan_segments
            remove_orphan_segments(since=time.time() - wall)
        if res_path.is_file():
            return read_structured(res_path, "run result"), wall, _tail(output)
        if code == 130:
            raise KeyboardInterrupt
        last = _tail(output, 1) or "no output"
        result = {"status": "failed",
                  "error": f"ChildProcessError: the run's process exited with code {code} "
                           f"without a result ({last})"}
        if code < 0:  # a signal: kill -9, the OOM killer
            result["killed_by"] = -code
        return result, wall, _tail(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def warm_jit(jit: tuple, jit_cache: Path, timeout: float = DEFAULT_TIMEOUT):
    """Compile ``(backend, dtype)``'s kernels into the empty study cache in a child process.
    Returns (cold compile seconds or None, a message)."""
    backend, dtype = jit
    # the environment of a path that runs this backend alone, formatted for one worker
    # (a path whose workers are NUMBA_NUM_THREADS compiles with 1)
    entry = next((p for p in P.PATHS.values()
                  if p.backends == (backend,) and p.launch != "mpiexec"), None)
    env = child_env(numba_cache=jit_cache)
    if entry is not None:
        env.update(entry.child_env({"threads": 1}))
    tmp = study_tempdir("warm")
    try:
        res_path = tmp / "result.json"
        cmd = [sys.executable, "-m", "cnn.study.child", "--warmup", backend, dtype,
               "--result", str(res_path), "--parent-pid", str(os.getpid())]
        try:
            proc = subprocess.run(cmd, env=env, cwd=_package_root(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout:g} s; the runs will compile for themselves"
        if not res_path.is_file():
            return None, (f"failed ({_tail(proc.stdout, 1) or proc.returncode}); the runs will "
                          f"compile for themselves")
        result = read_structured(res_path, "warm-up result")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if result.get("error"):
        return None, f"failed ({result['error']})"
    seconds = result.get("seconds")
    return seconds, (f"{seconds:.1f} s" if seconds is not None else "nothing to compile")


def _where(output: str) -> str:
    """``file:line in function`` of the deepest traceback frame inside this package."""
    root = _package_root() + os.sep
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', output or "")
    ours = [f for f in frames if f[0].startswith(root)]
    if not ours:
        return ""
    path, line, func = ours[-1]
    return f"{path[len(root):]}:{line} in {func}"


def run_backup_dir(out: Path, run: Run) -> Path | None:
    """Where ``run`` keeps its backups while it trains (None for a path not trained by
    :func:`cnn.train.fit`): beside the results file, ``.<name>.backups/<run_key>``, so that a
    study killed and started again finds them. Removed once the run is recorded ok or
    diverged."""
    if run.entry.trainer != "fit":
        return None
    out = Path(os.path.realpath(out))
    return out.parent / f".{out.name}.backups" / run.run_key


def _remove_backups(folder: Path | None) -> None:
    if folder is None:
        return
    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.rmdir()  # the study's folder of backups, once it is empty
    except OSError:
        pass


# ---- rows ---------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _parent_machine() -> dict:
    from ..machine import machine_info
    return dict(machine_info())


def sgemm_peak() -> float | None:
    """The machine's float32 GEMM rate on one BLAS thread (GFLOP/s), measured in a child
    process (so this process's BLAS threads stay as they are); None when it cannot be."""
    code = ("from cnn.bench.hardware import sgemm_peak; "
            "print(sgemm_peak(threads=1, repeats=3)['peak'])")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=300, env=child_env())
        return float(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def rows(run: Run, result: dict, started_at: str, run_time: float,
         cold_compile_time: float | None = None, peak: float | None = None) -> list[dict]:
    """The results rows of one run: one per epoch, or one for a run that did not finish."""
    base = {"run_key": run.run_key, "status": result.get("status", "failed"),
            "error": result.get("error", "")}
    base.update({k: run[k] for k in CONFIG_FIELDS})
    for k in ("train_size", "test_size"):
        if result.get(k) is not None:
            base[k] = result[k]  # what was actually used
    epochs = result.get("epochs") or []
    final = epochs[-1].get("test_accuracy") if epochs else None
    measured = {"compile_time": result.get("compile_time"),
                "cold_compile_time": cold_compile_time, "final_test_accuracy": final,
                "num_params": result.get("num_params"), "load_time": result.get("load_time"),
                "run_time": run_time, "started_at": started_at,
                "device": result.get("device", "cuda" if run.entry.needs_gpu else "cpu"),
                "order_index": run.order_index, "order_seed": run.order_seed,
                "hosts": result.get("hosts")}
    measured.update({k: result.get(k) for k in ("reduce_time", "tta_status", "time_to_target",
                                                "steps_to_target", "examples_to_target",
                                                "eval_trace", "flops_per_image")})
    machine = result.get("machine") or {**_parent_machine(), "source_hash": source_hash()}
    mach = {k: machine.get(k) for k in MACHINE_COLUMNS}
    mach["sgemm_peak_gflops"] = peak
    if base["status"] == "ok" and not epochs:
        base.update(status="failed", error="RuntimeError: the run recorded no epochs")
    if base["status"] != "ok":
        epochs = [{}]  # one row for a run that did not finish, measurements missing
    return [{**base, **{k: e.get(k) for k in EPOCH_FIELDS}, **measured, **mach} for e in epochs]


def fmt_run(run: Run) -> str:
    return (f"{run.dataset} {run.model} {run.variant} t{run.threads} b{run.batch_size} f{run.filters} "
            f"e{run.epochs} n{run.train_size} r{run.repeat}")


def _summary_line(rs: list[dict], wall: float) -> str:
    first = rs[0]
    if first["status"] == "diverged":
        return f"DIVERGED after {wall:.1f} s: {first['error']}"
    if first["status"] != "ok":
        return f"FAILED after {wall:.1f} s: {first['error']}"
    ips = [r["images_per_sec"] for r in rs if r["images_per_sec"] is not None]
    acc = first["final_test_accuracy"]
    ips_txt = f"{sorted(ips)[len(ips) // 2]:,.0f} img/s" if ips else "? img/s"
    acc_txt = f"{acc:.4f}" if acc is not None else "?"
    return f"ok in {wall:.1f} s: {ips_txt}, test acc {acc_txt}"


def _preflight(runs: list[Run], data_root, download: bool) -> None:
    """Fail early, before any run, when a real data set is missing (downloading it once here
    rather than in every child)."""
    from ..data import load_dataset
    for name in sorted({r.dataset for r in runs} - set(SYNTHETIC) - {"mnist_embedded"}):
        load_dataset(name, root=data_root, limit=1, test_limit=1, download=download)


# ---- the study ------------------------------------------------------------------------------------
def run_study(grid_or_profile="quick", out=DEFAULT_RESULTS, data_root=None,
              progress: bool | Callable[[dict], None] = True, retry_failed: bool = True,
              download: bool = True, timeout: float | None = None, gpu: bool | None = None,
              wait: float | None = 0.0, order_seed: int | None = 0):
    """Run every run of the grid not already done in ``out``; return the whole DataFrame.

    Everything that can be checked is checked before the first run: the grid, ``timeout``,
    that ``out`` can be written, that an existing ``out`` is an intact results file, the lock,
    and the data sets.

    Args:
        grid_or_profile: a name in :data:`cnn.study.PROFILES` or a grid (:mod:`cnn.study.grid`).
        out: the results pickle; rewritten atomically and fsynced after every run.
        data_root: where MNIST / CIFAR-10 live (default ``$CNN_DATA_DIR`` or the cache).
        progress: True prints one line per run; a callable receives, after each run is
            saved, ``{"index", "total", "config", "rows", "wall"}`` (``config``: the
            :class:`~cnn.study.run.Run`, a mapping of its columns; raising from it stops the
            study, with every finished run kept).
        retry_failed: rerun runs recorded as failed (default) instead of skipping them.
        download: let the loaders download missing data sets.
        timeout: per-run timeout in seconds (positive), overriding the grid's.
        gpu: whether a GPU is present (None detects it), for paths that need one.
        wait: seconds to wait for another study holding ``out`` (0: refuse at once, None:
            wait as long as it takes).
        order_seed: seed of the randomised run order within each repeat block
            (:func:`cnn.study.grid.plan_order`; None: the declared order), recorded per run.
    Returns:
        every row in ``out`` after the study (earlier rows included), typed per the schema.
    """
    timeout = check_timeout(timeout)
    out = check_out_path(out)
    say = print if progress is True else (lambda *a, **k: None)
    order_seed = check_int(None, "order_seed", order_seed, low=None, optional=True)
    runs = plan_order(expand_grid(grid_or_profile, gpu=gpu), order_seed)
    everything = expand_grid(grid_or_profile, gpu=gpu, include_unavailable=True)
    with ResultsLock(out, wait=wait):
        df = load_results(out, missing_ok=True)
        if len(everything) > len(runs):
            why = sorted({f"{r.path} ({unavailable(r.entry, gpu, r.cuda_simulator)})"
                          for r in everything if unavailable(r.entry, gpu, r.cuda_simulator)})
            say(f"skipping {len(everything) - len(runs)} run(s) that cannot run on this "
                f"machine: {', '.join(why)}; nothing is recorded for them (a grid may set "
                f"cuda_simulator=True to run CUDA under the simulator)")
        skip = done_keys(df, retry_failed)
        todo = [r for r in runs if r.run_key not in skip]
        check_clusters(todo)
        say(f"study: {len(runs)} runs, {len(runs) - len(todo)} already in {out}, "
            f"{len(todo)} to run")
        removed = clean_stale_tempdirs()
        if removed:
            say(f"removed {len(removed)} temporary folder(s) left by studies that were killed")
        if todo:
            _preflight(todo, data_root, download)
        jit_cache = study_tempdir("jit")
        cold: dict[tuple, float | None] = {"peak": sgemm_peak() if todo else None}
        if todo and cold["peak"]:
            say(f"single-core SGEMM peak of this machine: {cold['peak']:.1f} GFLOP/s")
        clusters = Clusters(todo)
        try:
            _run_all(todo, df, out, data_root, download, timeout, progress, say, jit_cache,
                     cold, clusters)
        finally:
            clusters.close()
            shutil.rmtree(jit_cache, ignore_errors=True)
        df = typed(load_results(out, missing_ok=True))
    if todo:
        mine = df[df["run_key"].isin([r.run_key for r in runs])].drop_duplicates("run_key")
        n_failed = int((mine["status"] == "failed").sum())
        n_div = int((mine["status"] == "diverged").sum())
        say(f"study done: {len(todo)} run(s) this time, {n_failed} failed and {n_div} diverged "
            f"in this grid; results in {out.resolve()}")
    return df


def _run_all(todo, df, out, data_root, download, timeout, progress, say, jit_cache, cold,
             clusters):
    import pandas as pd
    for i, run in enumerate(todo, 1):
        if timeout is not None:
            run = replace(run, timeout=float(timeout))
        jit = run.jit_key()
        if jit is not None and jit not in cold:
            say(f"compiling the {jit[0]} kernels ({jit[1]}) into the study's JIT cache ...",
                end="", flush=True)
            cold[jit], message = warm_jit(jit, jit_cache)
            say(f" {message}", flush=True)
        started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        say(f"[{i}/{len(todo)}] {fmt_run(run)} ...", end="", flush=True)
        backups = run_backup_dir(out, run)
        if backups is not None and backup_files(backups):  # a study before this one was killed
            say(" (resuming from its backup)", end="", flush=True)
        mpiexec = clusters.mpiexec(run, say)
        result, wall, output = launch(run, data_root, download, jit_cache, backups, mpiexec)
        for _ in range(RESTARTS):  # its process died: the run goes on from its last backup
            if not (result.get("killed_by") and backups is not None and backup_files(backups)):
                break
            say(f" its process was killed (signal {result['killed_by']}); resuming it from "
                f"its backup ...", end="", flush=True)
            result, more, output = launch(run, data_root, download, jit_cache, backups,
                                          mpiexec)
            wall += more
        rs = rows(run, result, started, wall, cold.get(jit), cold.get("peak"))
        new = typed(pd.DataFrame(rs))
        kept = df[df["run_key"] != run.run_key]
        df = typed(pd.concat([kept, new], ignore_index=True)) if len(kept) else new
        save_results(df, out)  # durable before the next run starts
        if rs[0]["status"] in ("ok", "diverged"):
            _remove_backups(backups)
        say(" " + _summary_line(rs, wall), flush=True)
        if rs[0]["status"] == "failed" and (where := _where(output)):
            say(f"    raised at {where}", flush=True)
        if callable(progress):
            progress({"index": i, "total": len(todo), "config": run, "rows": rs, "wall": wall})
