"""Multi-LoRA serving: many adapters over one base model, rows of different adapters in the same engine step.

``request.LoRARequest`` names an adapter (vLLM's shape); ``weights`` reads and validates adapter files against
the model; ``layers.BatchedLoRALinear`` wraps the model's projections from outside and adds each row's low-rank
delta; ``manager.LoRAManager`` owns the registry, the CPU cache (LRU) and the active slots.
"""

from cubelm.engine.lora.request import LoRARequest

__all__ = ["LoRARequest"]
