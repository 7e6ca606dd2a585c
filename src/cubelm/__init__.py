"""cubelm: a hackable, end-to-end LLM system in Python.

The package layout follows the lifecycle: ``data`` → ``model`` → ``train`` → ``engine`` → ``systems``.
Command line: ``cubelm --help``. Heavy modules (torch) are imported lazily so ``cubelm --help`` stays fast.
"""

__version__ = "0.1.0"


def __getattr__(name):  # ``from cubelm import LLM, LoRARequest, SamplingParams`` without importing torch first
    if name == "LLM":
        from cubelm.engine.llm import LLM
        return LLM
    if name == "LoRARequest":
        from cubelm.engine.lora.request import LoRARequest
        return LoRARequest
    if name == "SamplingParams":
        from cubelm.engine.params import SamplingParams
        return SamplingParams
    raise AttributeError(name)
