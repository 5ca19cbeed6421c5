"""Fixtures: one adapter per backend for the whole session (the MXNet one is a worker process).

A backend that cannot run is a loud skip that names the command that builds it, except where
DENSENET_REQUIRE_MXNET=1 (CI): there a missing MXNet environment fails the test.
"""
from __future__ import annotations

import ctypes
import os

# XLA on the CPU: compile for compile speed, not run speed (densenet_cli.main.fast_compile_flags,
# what `densenet check` uses). The suite compiles dozens of whole networks once each on tiny
# batches, where XLA's default (LLVM -O2, fusion emitters) spends ~3x longer compiling than
# running. Same operations, same IEEE arithmetic: only the machine code differs. Set before JAX
# starts; the benchmarks (benchmarks/) keep XLA's defaults.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    from densenet_cli.main import fast_compile_flags
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + fast_compile_flags()).strip()

# Python's cyclic garbage collector every 50,000 new container objects instead of every 700:
# tracing a deep network allocates millions (JAX's tracers, equations, NNX's graph walks), and
# at the default thresholds the collector's passes over them took a fifth of the time
# (DenseNet-264's float64 step, traced and differentiated in one process: 7.5 to 6.0 s; its
# torch reference 4.6 to 4.0 s). Garbage without cycles is freed at once as ever; the release
# after a heavy test (_release_memory, below) collects the rest.
import gc  # noqa: E402

from densenet_cli.main import GC_THRESHOLD  # noqa: E402  (the `densenet` program's setting)

gc.set_threshold(*GC_THRESHOLD)

# One persistent JAX compilation cache for the run, in its own temporary folder, shared by both
# workers and every process they start (JAX reads the variables when it is imported), removed
# when the run ends. It pays where one program is compiled twice: a run resumed in a new process
# compiles what the first one did; NNX and linen trace the same programs (densenet_flax/adapter.py,
# compiled in pieces), and the second variant runs what the first compiled, kept by the Flax
# adapter (densenet_flax/adapter.py) or in the worker's memory (_executables_in_memory, below).
# Only programs that took a second or more to compile are written.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR") and not os.environ.get("PYTEST_XDIST_WORKER"):
    import atexit
    import shutil
    import tempfile
    _JAX_CACHE = tempfile.mkdtemp(prefix="densenet-suite-jax-cache-")
    atexit.register(shutil.rmtree, _JAX_CACHE, True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _JAX_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import pytest

from densenet_parity.backends import (BACKEND_NAMES, MXNET_HINT, ROOT, BackendUnavailable,
                                      make_backend, mxnet_python, process_memory)

#: The suite's time and memory monitor: prints the peak of the whole process tree and the
#: heaviest tests at the end of every run (parity_tests/suite_monitor.py).
pytest_plugins = ["parity_tests.suite_monitor"]

_cache = {}


def need_mxnet() -> str:
    """The MXNet interpreter, or a skip saying how to build it (a failure under
    DENSENET_REQUIRE_MXNET=1, as CI sets: there only GPU tests may skip)."""
    py = mxnet_python()
    if py is None:
        if os.environ.get("DENSENET_REQUIRE_MXNET") == "1":
            pytest.fail(f"DENSENET_REQUIRE_MXNET=1 but: {MXNET_HINT}")
        pytest.skip(MXNET_HINT)
    return py


def cli_env(**extra):
    """The environment for a command-line run of this project (and for the MXNet environment's
    interpreter). One thread per process: the suite runs under pytest -n 2 on two cores, where
    more threads only contend (PyTorch's OpenMP spins); every run of a comparison gets the same
    setting."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    py = mxnet_python()
    if py:
        env["DENSENET_MXNET_PYTHON"] = py
    env.update(extra)
    return env


def get_backend(name):
    if name == "mxnet":
        need_mxnet()
    if name not in _cache:
        _cache[name] = make_backend(name)
    b = _cache[name]
    try:
        b.call("info")
    except BackendUnavailable as e:
        pytest.skip(str(e))
    return b


@pytest.fixture(params=BACKEND_NAMES)
def backend(request):
    """Every backend in turn: torch, mxnet (worker), flax-nnx, flax-linen."""
    return get_backend(request.param)


@pytest.fixture
def backends():
    """All backends at once, for cross-backend comparisons."""
    return [get_backend(n) for n in BACKEND_NAMES]


# ---------------------------------------------------------------- memory and scheduling
# The float64 SGD step of a deep preset compiles a program of ~6000 XLA kernels: XLA's compiler
# needs up to 3 GB for it (DenseNet-264) and the allocator keeps what it freed. Two such steps
# on the two workers at once, plus everything the workers hold, went past CI's 24 GiB. So:
# (1) after every test, a worker that holds much gives memory back (freed heap pages; above
#     RELEASE_ABOVE also compiled programs and garbage), its MXNet worker too;
# (2) the giants' float64 steps and Flax forwards form one xdist group ("giants"), which runs
#     on one worker, first, preset by preset (heaviest first), so that
#     torch's float64 reference is computed once per preset and two giants never coincide;
# (3) every other preset's float64 steps form a group per preset (one reference each);
# (4) the order of the run is: the giants, light tests, heavy tests (HEAVY_MODULES and the groups
#     of (3), up to ~2.8 GB a test), so that while one worker runs the giants' heaviest steps
#     (DenseNet-264, -161, -BC-190: up to 4.8 GB) the other runs light ones.
# `make test` runs pytest with `--dist loadgroup --no-loadscope-reorder` (xdist hands out work
# in this order, not largest group first); without xdist the groups change nothing.

#: After a test a pytest worker above TRIM_ABOVE returns its allocator's freed pages to the
#: system (malloc_trim: milliseconds); one still above RELEASE_ABOVE also drops what its
#: frameworks cache (JAX's compiled programs) and collects garbage (a tenth of a second or more:
#: not after every test). A worker with torch and JAX loaded holds ~0.55 GB, an MXNet worker
#: ~0.2 GB; an MXNet worker that stays above MXNET_RESTART_ABOVE is stopped (the next call
#: starts a fresh one, 2 s); after a giant's MXNet step it is stopped whatever it holds (it
#: kept 0.34-0.39 GB through the Flax steps that follow, the run's peak).
#: Between two tests of one module the release waits until the worker is above
#: RELEASE_WITHIN_MODULE: what a release cannot give back (the frameworks' libraries, the tests'
#: module caches: a worker sits near 1.5 GB late in the run) is not worth another. At b3fe2d7 a
#: run made 122 releases (0.5-1.2 s each, and every compiled program dropped with them); 89 of
#: them gained less than 0.25 GB, 43 of its test seconds. (A margin over what the last release
#: kept, instead of a fixed level, let the workers creep up: a run at da5f962 peaked at 7.55 GB.)
TRIM_ABOVE = 1.0e9
RELEASE_ABOVE = 1.5e9
RELEASE_WITHIN_MODULE = 1.75e9
MXNET_RELEASE_ABOVE = 0.5e9
MXNET_RESTART_ABOVE = 0.8e9
#: The giants, heaviest first (the peak of their Flax steps' process tree: 4.8, 4.3, 4.0, 3.6,
#: 3.6, 3.4 GB), so that the heaviest meet the other worker's light tests.
GIANTS = ("densenet264", "densenet161", "densenet_bc190", "densenet_bc250", "densenet201",
          "densenet169")
#: Modules whose tests build, train or convert whole models (1.5 to 3.5 GB a test; the profile
#: in docs/performance/test-suite.md): run after the light ones.
#: In the order they run: the lighter trees first (they may still meet the giants' last steps on
#: the other worker), the float64 groups of (3) after test_memory_efficient, and last the modules
#: whose tests start heavy subprocesses (torchrun's processes, torch.compile's C++ compiler):
#: a run at 46a59ae peaked at 7.30 GB where test_benchmarks, then first, met DenseNet-BC-190;
#: one at 076cd4f at 6.49 GB where test_recipes' fixture (every case of every backend, a 3.1 GB
#: tree), then among the light tests, met the giants' MXNet step: it now comes after test_check.
HEAVY_MODULES = ("parity_tests/test_check.py", "parity_tests/test_recipes.py",
                 "parity_tests/test_keras.py",
                 "parity_tests/test_cli.py",
                 "parity_tests/test_convert.py", "parity_tests/test_onnx.py",
                 "parity_tests/test_memory_efficient.py",
                 "parity_tests/test_train.py", "parity_tests/test_house.py",
                 "parity_tests/test_train_parallel.py",
                 "parity_tests/test_benchmarks.py")
_GROUPS_AFTER = HEAVY_MODULES.index("parity_tests/test_memory_efficient.py")
#: The last module's longest tests go first within it, so that the two workers finish
#: together: the GPU check's dry run (~40 s) started last at cfb36dd and its worker ran 16 s
#: alone at the end of the run.
LONGEST_FIRST = ("test_gpu_check_dry_runs_every_step_and_records_a_failure",
                 "test_data_parallel_scaling_benchmark_runs")
_STEP = "test_gradients_and_one_sgd_step"
_FORWARD = "test_eval_forward_every_stage"


def _group(item):
    """The xdist group of a test (None: no group) and its place in the giants' order."""
    if item.nodeid.startswith("parity_tests/test_benchmarks.py::test_fast_path_agrees_with_plain"):
        # one process runs a backend's fast paths for all its tests (test_benchmarks._checks):
        # split over the two workers, it ran twice
        return f"fast-paths-{item.callspec.params['backend']}"
    if item.nodeid.startswith("parity_tests/test_recipes.py::"):
        # its module fixture runs every case of every backend (46 s, a 3.1 GB tree): split over
        # the two workers, both ran it at once (a run at c39ebdc: 6.68 GB, 47 s twice)
        return "recipes"
    if not item.nodeid.startswith("parity_tests/test_numeric.py::"):
        return None
    name = getattr(item, "callspec", None) and item.callspec.params.get("name")
    fn = item.originalname
    if name in GIANTS and (fn == _STEP or (fn == _FORWARD and item.callspec.params["other"] != "mxnet")):
        return "giants"
    if fn == _STEP:
        return f"float64-{name}"
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist's, which reads the groups into the node ids
def pytest_collection_modifyitems(config, items):
    def order(item):
        g = _group(item)
        if g == "giants":
            return (0, GIANTS.index(item.callspec.params["name"]), item.originalname != _STEP)
        module = item.nodeid.split("::")[0]
        if module in HEAVY_MODULES:
            return (2, HEAVY_MODULES.index(module), int(item.originalname not in LONGEST_FIRST))
        if g is not None:
            return (2, _GROUPS_AFTER, 2)
        return (1, 0, 0)
    for item in items:
        g = _group(item)
        if g:
            item.add_marker(pytest.mark.xdist_group(g))
    items.sort(key=order)  # stable: everything else keeps its collection order


_GROUPS_LOST: list = []


def pytest_collection_finish(session):
    """Under ``--dist loadgroup`` every grouped test's node id must carry its group (pytest-xdist
    appends ``@group``); where a pytest and pytest-xdist pair loses it (pytest 9.2 with xdist
    3.8), the groups vanish and two giants can run at once: each grouped test then fails with
    the reason (a worker that stopped collection would leave only an INTERNALERROR)."""
    if getattr(session.config.option, "loadgroup", False):
        _GROUPS_LOST[:] = [i.nodeid for i in session.items
                           if any(True for _ in i.iter_markers("xdist_group"))
                           and "@" not in i.nodeid]
    _freeze_what_is_imported()


def _freeze_what_is_imported():
    """What collection imported (torch, JAX, Keras, ONNX, the tests' modules: ~0.43 million
    objects) out of the garbage collector's sight (gc.freeze): a full collection, after each
    test above RELEASE_ABOVE (an adapter's release_memory) and whenever Python's thresholds
    call one, walks every tracked object, and these live as long as the worker (0.18 s a
    collection for them alone; the releases' collections took ~135 CPU-seconds of a run
    before). Frozen objects are still freed by their reference counts; only a reference cycle
    among them would stay, and what is imported once is not dropped."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _groups_in_effect(request):
    if _GROUPS_LOST and request.node.nodeid in _GROUPS_LOST:
        import xdist
        pytest.fail(f"--dist loadgroup did not take effect: pytest {pytest.__version__} with "
                    f"pytest-xdist {xdist.__version__} left {len(_GROUPS_LOST)} grouped tests "
                    "without their group, so the memory-heavy ones could run at once; install "
                    "the versions pinned in constraints.txt", pytrace=False)


#: What a worker held after its last trim: a worker under the release level that has not grown
#: by TRIM_STEP since is not trimmed again (malloc_trim walks the whole heap: ~7 ms a test late
#: in the run, 4.8 CPU-seconds at cfb36dd in py-spy, mostly for nothing to give back).
_LAST_TRIM: list = [0]
TRIM_STEP = 64e6


def _trimmed(level: float) -> int:
    """This worker's memory after a trim where one is due (see TRIM_ABOVE): above ``level``
    (a release is decided on trimmed memory) or grown by TRIM_STEP since the last trim."""
    held = process_memory(os.getpid())
    if held > TRIM_ABOVE and (held > level or held > _LAST_TRIM[0] + TRIM_STEP):
        held = _LAST_TRIM[0] = _trim()
    return held


def _trim() -> int:
    """malloc_trim(0): freed heap pages back to the system; this process's RSS afterwards."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return process_memory(os.getpid())


#: Compiled programs a worker keeps in memory, by the persistent cache's key: the newest of
#: those that took KEEP_ABOVE_S or more to compile (the Flax adapter compiles a deep preset's
#: float64 step as ~40 pieces of 0.1-0.5 s each: densenet_flax.runtime.jit_in_pieces; the disk
#: keeps only what took a second or more).
KEEP_EXECUTABLES = 256
KEEP_ABOVE_S = 0.05
_executables: dict = {}


@pytest.fixture(autouse=True, scope="session")
def _executables_in_memory():
    """JAX's persistent compilation cache, read first from this worker's memory. NNX and linen
    compile the same programs (above), one after the other in one worker; from the disk, the
    second variant's copy of a deep preset's float64 backward pass deserialises in 10-15 s
    (DenseNet-264: 14.5 s, against 25 s to compile it). The executable is the one XLA compiled
    for the same key, which is the fingerprint of the same program with the same options: what
    the disk would have given, without reading it back. (JAX's own in-memory caches are per
    traced function, and the two variants' functions differ.)"""
    try:
        from jax._src import compiler
    except ImportError:  # no JAX: nothing to keep
        yield
        return
    read, write = getattr(compiler, "_cache_read", None), getattr(compiler, "_cache_write", None)
    if read is None or write is None:  # another JAX: its disk cache alone
        yield
        return

    def cache_read(module_name, cache_key, *args):
        if cache_key in _executables:
            _executables[cache_key] = _executables.pop(cache_key)  # the newest last
            return _executables[cache_key]
        return read(module_name, cache_key, *args)

    def cache_write(cache_key, compile_time, module_name, backend, executable, *args):
        if compile_time >= KEEP_ABOVE_S:
            _executables[cache_key] = (executable, compile_time)
        while len(_executables) > KEEP_EXECUTABLES:
            _executables.pop(next(iter(_executables)))
        return write(cache_key, compile_time, module_name, backend, executable, *args)

    compiler._cache_read, compiler._cache_write = cache_read, cache_write
    try:
        yield
    finally:
        compiler._cache_read, compiler._cache_write = read, write
        _executables.clear()


def _shares_programs(item, nextitem) -> bool:
    """Whether ``nextitem`` (the next test on this worker) compiles what ``item`` did: the same
    test function with the same parameters but the backend (NNX then linen)."""
    a, b = getattr(item, "callspec", None), getattr(nextitem, "callspec", None)
    if a is None or b is None or item.originalname != nextitem.originalname:
        return False

    def rest(params):
        return {k: v for k, v in params.items() if k not in ("other", "backend")}
    return rest(a.params) == rest(b.params)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item, nextitem):
    """The compiled programs kept in memory (``_executables``) go when the next test will not
    use them, before ``_release_memory`` measures the worker: a worker that kept a giant's
    programs stayed above RELEASE_ABOVE, and every light test after it paid a release (the
    45 tests of test_spec.py: 1 s to 48 s)."""
    _NEXT[0] = nextitem
    if not _shares_programs(item, nextitem):
        _executables.clear()


#: The next test on this worker (set at a test's teardown, before _release_memory runs).
_NEXT: list = [None]


def _module(item):
    return item.nodeid.split("::")[0] if item is not None else None


#: Modules whose tests read one module fixture that holds what a worker has: a worker above
#: RELEASE_ABOVE gives nothing back between them (a release after each of test_recipes' 71
#: tests, 0.7-0.9 s each, at 5256a53).
SHARED_FIXTURE_MODULES = ("parity_tests/test_recipes.py",)
#: Modules whose tests start heavy processes of their own (torchrun's ranks, the trainers, the
#: GPU check's steps; test_keras its own MXNet worker) and never call this worker's MXNet
#: worker: it is stopped before them (a run at 64f0004 peaked at 6.21 GB in
#: test_train_parallel, its 0.52 GB among the rest; runs at ec26c2b at 5.64-6.65 GB where
#: test_keras' DenseNet-121 met test_recipes' fixture, each worker's MXNet worker idle at
#: 0.15-0.71 GB beside them).
SUBPROCESS_MODULES = ("parity_tests/test_keras.py", "parity_tests/test_train_parallel.py",
                      "parity_tests/test_benchmarks.py")
#: Modules that start with a fresh MXNet worker: test_recipes' fixture (every case of every
#: backend, ~1 GB more in its worker) runs beside the other worker's heavy tests, the run's
#: peak; a fresh MXNet worker runs its thirteen sessions at ~0.2 GB, where one carried in from
#: earlier tests held 0.45-0.56 GB (a working-tree run after cfb36dd peaked there at 5.69 GB,
#: 0.56 of it the MXNet worker).
FRESH_MXNET_MODULES = ("parity_tests/test_recipes.py",)


@pytest.fixture(autouse=True)
def _release_memory(request):
    """After each test, the processes of this worker give memory back (see TRIM_ABOVE)."""
    yield
    import sys
    item, nextitem = request.node, _NEXT[0]
    # the next test reads the same module fixture (test_recipes' runs): nothing to give back
    same_fixture = _module(nextitem) == _module(item) and _module(item) in SHARED_FIXTURE_MODULES
    # before another module's tests the worker is brought under RELEASE_ABOVE where it can be
    # (a run that waited there too met test_keras' worker at 3.4 GB beside test_recipes'
    # fixture: 6.65 GB); between two tests of one module, above RELEASE_WITHIN_MODULE only
    level = RELEASE_WITHIN_MODULE if _module(nextitem) == _module(item) else RELEASE_ABOVE
    if _trimmed(level) > level and not same_fixture:
        # One adapter's release: the Flax one drops JAX's compiled programs, then collects
        # garbage and trims the heap, all that the PyTorch one does (both, one after the
        # other, collected twice: the second collection took 13 CPU-seconds of a run at
        # cfb36dd, in py-spy). Where the next test compiles what this one did (NNX, then
        # linen), the Flax adapter keeps its compiled programs for it (the train step by its
        # forward pass's text, the stages' forward by the program's: densenet_flax/adapter.py),
        # and PyTorch's release collects and trims.
        if "jax" in sys.modules and not _shares_programs(item, nextitem):
            _LAST_TRIM[0] = get_backend("flax-nnx").call("release_memory")  # trims too
        elif "torch" in sys.modules:
            _LAST_TRIM[0] = get_backend("torch").call("release_memory")
    mx = _cache.get("mxnet")
    if mx is not None and _group(request.node) == "giants" and "[mxnet-" in request.node.nodeid:
        # The giants' Flax steps (the run's peak) follow: their worker's MXNet worker, left
        # with 0.34-0.39 GB by a giant's step, is stopped (the next preset's starts one, 2 s).
        mx.close()
    elif mx is not None and (_module(nextitem) in SUBPROCESS_MODULES or (
            _module(nextitem) in FRESH_MXNET_MODULES and _module(nextitem) != _module(item))):
        mx.close()  # the next call starts a fresh one (2 s)
    elif mx is not None and mx.memory() > MXNET_RELEASE_ABOVE:
        if mx.call("release_memory") > MXNET_RESTART_ABOVE:
            mx.close()


def pytest_sessionfinish(session, exitstatus):
    for b in _cache.values():
        b.close()
