"""densenet_parity: the parity engine.

Above the three mirrors and below the command line: the backend registry (torch and Flax in
this process, Gluon through its worker in the MXNet environment: ``backends``), the comparisons
(``compare``), the parity report (``report``), checking a user's model (``checking``), the
converter between every framework's files (``convert``), the ONNX export and its proof
(``export``, which reads its source with ``convert``) and the canonical random weights the check
and the export use (``states``). It imports the mirrors lazily, one framework at a time, so that
a user without MXNet or without JAX can use the rest. No module imports one that imports it back
(parity_tests/test_import_cycles.py).
"""

from densenet_parity.checking import CheckError, Report, assert_same_densenet, check, check_weights

__all__ = ["CheckError", "Report", "assert_same_densenet", "check", "check_weights"]
