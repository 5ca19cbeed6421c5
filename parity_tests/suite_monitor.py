"""Where the suite's time and memory go: a pytest plugin (loaded by conftest.py).

Memory is the resident set size (RSS, /proc/PID/statm) summed over a process tree: what ``top``
and the kernel's out-of-memory killer count. A page shared by several processes (a library
mapped by both pytest workers) counts once per process, so the sum errs high by a few hundred
MB per process, never low. (The proportional set size would split shared pages exactly, but
reading it makes the kernel walk every page table: 50 ms for one JAX worker of 5 GB, too
slow to sample several times a second on two cores.)

* The controller (the process that ``pytest`` started; with pytest-xdist the one that
  coordinates the workers) samples the whole tree every ``INTERVAL`` seconds: itself, every
  worker and everything they started (the MXNet workers, command-line subprocesses). Its peak
  is the suite's peak.
* Each sample also keeps what each worker's own tree held (a worker and what it started).
  Every test's report carries the pid of the process that ran it and when it ran; a test's
  peak is the largest sample of that process's tree while it ran (a test shorter than the
  interval: the sample nearest it). The workers themselves sample nothing: a sampling thread
  in each worker cost ~30 CPU-seconds of a run (psutil lists every process on the machine to
  find a tree's children), on the cores the tests need.

At the end the run prints the peak, when it happened and what each process held then, the
heaviest tests by memory and by time, and a line per test module; ``--suite-profile PATH``
(or $DENSENET_SUITE_PROFILE) also writes all of it as JSON (benchmarks/suite_profile.py turns
that into docs/performance/test-suite.md). ``DENSENET_MEMORY_LIMIT_GB`` (set by .ci/run) turns a
peak above the limit into a failed run with a message that says so, so that a regression
reads as a message and not as a worker killed by the kernel at random.
"""
from __future__ import annotations

import bisect
import json
import os
import threading
import time
from typing import Dict, List, Optional, Tuple

import pytest

INTERVAL = 0.2  # seconds between samples
PROPERTY = "suite_monitor_pid"  # the pid of the process that ran a test
GB = 1e9


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _read_rss(pid: int) -> Optional[int]:
    """Resident memory of one process in bytes (/proc/PID/statm); None if it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
        pass
    try:
        import psutil
        return psutil.Process(pid).memory_info().rss
    except Exception:  # noqa: BLE001 - the process ended between listing and reading
        return None


def _label(pid: int) -> str:
    """A short name for a process: 'pytest-xdist worker', or its command line's start."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        try:
            import psutil
            argv = psutil.Process(pid).cmdline()
        except Exception:  # noqa: BLE001 - gone, or not ours to read
            return "?"
    if any("exec(eval(sys.stdin" in a for a in argv):
        return "pytest-xdist worker"
    return " ".join([os.path.basename(argv[0])] + argv[1:4]) if argv else "?"


def _children(pid: int) -> List[int]:
    """The pids of ``pid``'s children: /proc/PID/task/TID/children, one small file per thread
    (a JAX worker: ~20), where psutil reads the status of every process on the machine."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tasks = None
    if tasks and os.path.exists(f"/proc/{pid}/task/{tasks[0]}/children"):
        out: List[int] = []
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out += [int(c) for c in f.read().split()]
            except OSError:  # the thread ended between listing and reading
                pass
        return out
    try:  # a kernel without the children files, or not Linux
        import psutil
        return [c.pid for c in psutil.Process(pid).children()]
    except Exception:  # noqa: BLE001 - gone
        return []


def _subtree(pid: int) -> List[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def tree_memory(root_pid: int, labels: Optional[Dict[int, str]] = None
                ) -> Tuple[int, Dict[int, Tuple[int, str]], Dict[int, int]]:
    """(total bytes, {pid: (bytes, short command)}, {pid: bytes of its own tree}) for
    ``root_pid`` and its descendants; the last for ``root_pid`` (its whole tree) and each of
    its children (with xdist, each worker's). ``labels`` caches the commands by pid."""
    labels = {} if labels is None else labels
    per, trees = {}, {}
    for pids in [[root_pid]] + [_subtree(c) for c in _children(root_pid)]:
        held = 0
        for pid in pids:
            b = _read_rss(pid)
            if b is None:
                continue
            if pid not in labels:
                labels[pid] = _label(pid)
            held += b
            per[pid] = (b, labels[pid])
        trees[pids[0]] = held
    total = trees[root_pid] = sum(trees.values())
    return total, per, trees


class Sampler(threading.Thread):
    """Samples a process tree until stopped; keeps the overall peak and, per sample, the time
    and what each top-level process's tree held (``timeline``)."""

    def __init__(self, root_pid: int, interval: float = INTERVAL):
        super().__init__(daemon=True, name="suite-monitor")
        self.root_pid, self.interval = root_pid, interval
        self.peak, self.peak_at, self.peak_procs = 0, 0.0, {}
        self.samples = 0
        self.timeline: List[Tuple[float, Dict[int, int]]] = []  # (epoch seconds, {pid: bytes})
        self.labels: Dict[int, str] = {}
        self.started = time.monotonic()
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def sample(self) -> int:
        total, per, trees = tree_memory(self.root_pid, self.labels)
        with self._lock:
            self.samples += 1
            self.timeline.append((time.time(), trees))
            if total > self.peak:
                self.peak, self.peak_procs = total, per
                self.peak_at = time.monotonic() - self.started
        return total

    def run(self):
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        self.sample()


def window_peak(timeline: List[Tuple[float, Dict[int, int]]], pid: int, start: float,
                stop: float, times: Optional[List[float]] = None) -> int:
    """The largest sample of ``pid``'s tree from ``start`` to ``stop`` (epoch seconds) in a
    timeline sorted by time (``times``: its times, when the caller has them); with no sample in
    between, the sample nearest the window (0 if the timeline never saw ``pid``)."""
    times = [t for t, _ in timeline] if times is None else times
    lo, hi = bisect.bisect_left(times, start), bisect.bisect_right(times, stop)
    inside = [trees[pid] for _, trees in timeline[lo:hi] if pid in trees]
    if inside:
        return max(inside)
    near = [(abs(timeline[i][0] - (start + stop) / 2), timeline[i][1][pid])
            for i in (lo - 1, hi) if 0 <= i < len(timeline) and pid in timeline[i][1]]
    return min(near)[1] if near else 0


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def _limit_gb() -> Optional[float]:
    v = os.environ.get("DENSENET_MEMORY_LIMIT_GB")
    return float(v) if v else None


# ------------------------------------------------------------------ the plugin

def pytest_addoption(parser):
    parser.addoption("--suite-profile", metavar="PATH", default=None,
                     help="write the suite's time and memory profile as JSON (give it as "
                          "--suite-profile=PATH) "
                          "(default: $DENSENET_SUITE_PROFILE, else nothing)")


def pytest_configure(config):
    config.pluginmanager.register(Monitor(config), "densenet-suite-monitor")


class Monitor:
    def __init__(self, config):
        self.config = config
        self.tests: Dict[str, dict] = {}
        self.started = time.time()
        self.profile: Optional[dict] = None
        self.over_limit = False
        # Only the controller samples (without xdist the one process): the tree's peak and, for
        # each test's peak, what the tree of the process that ran it held.
        self.sampler = None if _is_worker(config) else Sampler(os.getpid())
        if self.sampler is not None:
            self.sampler.start()

    # -- per test, where tests run: which process ran it
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        if call.when == "teardown":
            item.user_properties.append((PROPERTY, os.getpid()))
        yield

    # -- collected in the controller (xdist forwards the workers' reports)
    def pytest_runtest_logreport(self, report):
        if self.sampler is None:
            return
        t = self.tests.setdefault(report.nodeid, {"seconds": 0.0, "peak_bytes": 0,
                                                  "outcome": "passed"})
        t["seconds"] += report.duration
        start, stop = getattr(report, "start", None), getattr(report, "stop", None)
        if start is not None and stop is not None:  # epoch seconds (pytest >= 7.1)
            t["start"] = min(t.get("start", start), start)
            t["stop"] = max(t.get("stop", stop), stop)
        if report.failed:
            t["outcome"] = "failed"
        elif report.skipped and t["outcome"] == "passed":
            t["outcome"] = "skipped"
        for key, value in getattr(report, "user_properties", []):
            if key == PROPERTY:
                t["pid"] = int(value)

    def _test_peaks(self) -> None:
        """Each test's peak_bytes from the sampler's timeline (see the module's docstring)."""
        with self.sampler._lock:
            timeline = list(self.sampler.timeline)
        times = [t for t, _ in timeline]
        for t in self.tests.values():
            pid = t.pop("pid", None)
            if pid is not None and "start" in t:
                t["peak_bytes"] = window_peak(timeline, pid, t["start"], t["stop"], times)

    def make_profile(self) -> dict:
        """The run's profile: peak, per process at the peak, per test, per module."""
        s = self.sampler
        modules: Dict[str, dict] = {}
        for nodeid, t in self.tests.items():
            m = modules.setdefault(nodeid.split("::")[0],
                                   {"seconds": 0.0, "peak_bytes": 0, "tests": 0})
            m["seconds"] += t["seconds"]
            m["peak_bytes"] = max(m["peak_bytes"], t["peak_bytes"])
            m["tests"] += 1
        peak_epoch = self.started + s.peak_at
        running = sorted(n for n, t in self.tests.items()
                         if t.get("start", 1e300) <= peak_epoch <= t.get("stop", -1) + 0.5)
        return {
            "peak_bytes": s.peak, "running_at_peak": running, "peak_at_seconds": round(s.peak_at, 1),
            "wall_seconds": round(time.time() - self.started, 1),
            "interval_seconds": s.interval, "samples": s.samples,
            "measure": "RSS summed over the process tree",
            "peak_processes": [{"pid": pid, "bytes": b, "command": cmd}
                               for pid, (b, cmd) in sorted(s.peak_procs.items(),
                                                           key=lambda kv: -kv[1][0])],
            "limit_gb": _limit_gb(), "tests": self.tests, "modules": modules,
        }

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session, exitstatus):
        if self.sampler is None:
            return
        self.sampler.stop()
        self._test_peaks()
        prof = self.profile = self.make_profile()
        path = self.config.getoption("--suite-profile") or os.environ.get("DENSENET_SUITE_PROFILE")
        if path:
            with open(path, "w") as f:
                json.dump(prof, f, indent=1)
        limit = prof["limit_gb"]
        if limit is not None and prof["peak_bytes"] > limit * GB:
            self.over_limit = True
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        prof = self.profile
        if prof is None:
            return
        tr = terminalreporter
        tr.section("time and memory (parity_tests/suite_monitor.py)")
        tr.write_line(f"peak memory of the whole run: {prof['peak_bytes'] / GB:.2f} GB "
                      f"({prof['measure']}, every {prof['interval_seconds']} s) at "
                      f"{prof['peak_at_seconds'] / 60:.1f} min of {prof['wall_seconds'] / 60:.1f}; "
                      "at the peak:")
        for p in prof["peak_processes"][:6]:
            tr.write_line(f"  {p['bytes'] / GB:6.2f} GB  pid {p['pid']:<7} {p['command']}")
        for nodeid in prof["running_at_peak"]:
            tr.write_line(f"  running: {nodeid}")
        tr.write_line("heaviest tests by memory (peak of the tree of the process that ran it):")
        for nodeid, t in _top(prof["tests"], "peak_bytes", 5):
            tr.write_line(f"  {t['peak_bytes'] / GB:6.2f} GB  {t['seconds']:6.1f} s  {nodeid}")
        tr.write_line("slowest tests:")
        for nodeid, t in _top(prof["tests"], "seconds", 5):
            tr.write_line(f"  {t['seconds']:6.1f} s  {t['peak_bytes'] / GB:6.2f} GB  {nodeid}")
        tr.write_line("per module (test seconds summed over workers, peak of one test):")
        for mod, m in sorted(prof["modules"].items(), key=lambda kv: -kv[1]["seconds"]):
            tr.write_line(f"  {m['seconds']:7.1f} s  {m['peak_bytes'] / GB:6.2f} GB  "
                          f"{m['tests']:4d} tests  {mod}")
        if self.over_limit:
            tr.write_line("")
            tr.write_line(f"FAILED: the suite's peak memory {prof['peak_bytes'] / GB:.2f} GB is above "
                          f"the limit of {prof['limit_gb']:g} GB (DENSENET_MEMORY_LIMIT_GB; the "
                          "budget is 8 GB on CI's 2-core, 24 GiB machine). The heaviest tests are "
                          "listed above.", red=True, bold=True)


def _top(tests: dict, key: str, n: int) -> List[Tuple[str, dict]]:
    return sorted(tests.items(), key=lambda kv: -kv[1][key])[:n]
