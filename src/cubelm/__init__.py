"""cubelm: a hackable, end-to-end LLM system in Python.

The package layout follows the lifecycle: ``data`` → ``model`` → ``train`` → ``engine`` → ``systems``.
Command line: ``cubelm --help``. Heavy modules (torch) are imported lazily so ``cubelm --help`` stays fast.
"""

__version__ = "0.1.0"
