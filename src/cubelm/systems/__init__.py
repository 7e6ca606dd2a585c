"""Systems arithmetic without torch: the memory planner (``memory``), FLOP counts (``flops``), and later the
roofline and pipeline-schedule simulator. ``cubelm plan`` and ``cubelm flops`` are in ``commands``."""
