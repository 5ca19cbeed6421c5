"""Models as users write them, for ``densenet check`` (parity_tests/test_check.py): the book's
listings as a reader types them (PyTorch, Gluon, a Flax linen version), each of which must be
the 'book' network, and versions with a porting bug, each of which must be named at the right
stage and layer. Plain modules: ``densenet check --framework torch
parity_tests.own_models.book_torch:net`` runs them from the repository root."""
