"""The parity suite and the parity report for densenet-suite."""
