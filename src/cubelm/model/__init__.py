"""The model: config + presets, layers, attention backends, the transformer, Hugging Face weight I/O.

    from cubelm.model import preset, build_model, load_model, save_model
"""

from cubelm.model.config import PRESETS, ModelConfig, preset, read_config_json, resolve_config


def __getattr__(name):  # torch-heavy names load lazily so config/planning code stays import-light
    if name in ("CausalLM", "build_model"):
        from cubelm.model import transformer
        return getattr(transformer, name)
    if name in ("load_model", "save_model"):
        from cubelm.model import hf_io
        return getattr(hf_io, name)
    raise AttributeError(name)


__all__ = ["ModelConfig", "PRESETS", "preset", "read_config_json", "resolve_config", "CausalLM", "build_model",
           "load_model", "save_model"]
