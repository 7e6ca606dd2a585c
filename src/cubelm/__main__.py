"""``python -m cubelm`` is the same as the ``cubelm`` console script."""

from cubelm.cli import entry

entry()
