"""``cubelm serve`` with a fault injected into the engine loop, for ``test_robustness.py``.

A request with ``seed`` = ``MARKER_SEED`` makes ``LLMEngine.step`` raise outside the engine's per-request isolation,
which kills the engine thread: the situation the server must survive by turning unhealthy and exiting non-zero.
Run as ``python tests/serve/fault_server.py serve --model DIR ...`` (the arguments of ``cubelm``).
"""

from cubelm.cli import entry
from cubelm.engine.llm_engine import LLMEngine

MARKER_SEED = 4242424242
_step = LLMEngine.step


def _faulty_step(self):
    if any(r.params.seed == MARKER_SEED for r in self.requests.values()):
        raise SystemError("injected fault: the engine loop dies")
    return _step(self)


if __name__ == "__main__":
    LLMEngine.step = _faulty_step
    entry()
