"""Speed and memory benchmarks of the three DenseNet mirrors (see benchmarks/bench.py).

``python -m benchmarks.bench --help``. Each measured case runs in a fresh process
(``python -m benchmarks.bench_case``), in the main environment for torch and Flax and in the
MXNet environment for MXNet, so peak memory is the case's own and nothing leaks between cases.
The case modules (bench_case, common, run_torch, run_mxnet, run_flax) import only the standard
library, numpy, densenet_spec, the one framework they measure and its backend package, so
they run under the MXNet environment's numpy 1.23 as well as under numpy 2.
"""
