"""Model configuration: one dataclass for the whole Llama family, read from and written to HF ``config.json``.

Field names are Hugging Face's, so a config round-trips through ``config.json`` without a mapping table.
Families (llama, mistral, qwen2) differ only in data: Qwen2 has q/k/v biases, Mistral a sliding window, some
models tie the embedding and the output head. Presets: ``nano``/``tiny``/``small``/``base`` are shapes cubelm trains;
the named real models are for planning (``cubelm plan``) and for loading real checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from cubelm.errors import CubelmError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(slots=True, kw_only=True)
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None means MHA (= num_attention_heads)
    head_dim: int | None = None  # None means hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF rope parameters beyond theta, e.g. {"rope_type": "llama3", ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # llama: bias on q, k, v and o; qwen2 always has q/k/v bias, never o bias
    mlp_bias: bool = False
    sliding_window: int | None = None  # mistral; qwen2 only when use_sliding_window
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    nominal_params: float | None = None  # the marketing size ("7B"), for the book's rules of thumb only

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise CubelmError(f"model_type {self.model_type!r} is not supported; cubelm reads "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-family decoders)")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CubelmError(f"config field {name} must be a positive integer, got {value!r}")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim <= 0):
            raise CubelmError(f"config field head_dim must be a positive integer, got {self.head_dim!r}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise CubelmError(f"config field sliding_window must be a positive integer or null, "
                              f"got {self.sliding_window!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise CubelmError(f"config field {name} must be a positive number, got {getattr(self, name)!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise CubelmError(f"config field rope_scaling must be an object or null, got {self.rope_scaling!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise CubelmError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                                  f"{self.num_attention_heads}; set head_dim explicitly or change the head count")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise CubelmError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CubelmError(f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads} (MHA, GQA or MQA)")
        if self.hidden_act != "silu":
            raise CubelmError(f"hidden_act {self.hidden_act!r} is not supported; Llama-family models use 'silu'")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise CubelmError(f"rope type {rope_type!r} is not supported; cubelm implements "
                              f"{', '.join(SUPPORTED_ROPE_TYPES)}")
        needed = {"default": (), "linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                                   "original_max_position_embeddings")}[rope_type]
        absent = [k for k in needed if not isinstance((self.rope_scaling or {}).get(k), (int, float))]
        if absent:
            raise CubelmError(f"rope scaling {rope_type!r} needs numeric {', '.join(absent)} in config.json")

    # ---- derived shapes -------------------------------------------------------------------------------
    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type == "llama" and self.attention_bias

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def num_params(self, *, include_embeddings: bool = True) -> int:
        """Exact parameter count of the model this config builds (matches ``sum(p.numel())``)."""
        h, L = self.hidden_size, self.num_hidden_layers
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        attn += (self.q_size + 2 * self.kv_size) if self.qkv_bias else 0
        attn += h if self.o_bias else 0
        mlp = 3 * h * self.intermediate_size + ((2 * self.intermediate_size + h) if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * h  # two RMSNorm weights
        total = L * per_layer + h  # final norm
        if include_embeddings:
            total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return total

    # ---- Hugging Face config.json ---------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise CubelmError("config.json must hold a JSON object")
        model_type = d.get("model_type")
        if model_type is None:
            raise CubelmError("config.json has no 'model_type'; expected one of " + ", ".join(SUPPORTED_MODEL_TYPES))
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CubelmError(f"model_type {model_type!r} is not supported; cubelm reads "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-family decoders)")
        # transformers >= 5 writes rope_parameters {rope_type, rope_theta, ...}; older files rope_theta + rope_scaling
        rope = dict(d.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        scaling = dict(d.get("rope_scaling") or {}) or rope
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        scaling.pop("rope_theta", None)
        if scaling.get("rope_type", "default") == "default" and len(scaling) <= 1:
            scaling = None
        sliding = d.get("sliding_window")
        if model_type == "qwen2" and not d.get("use_sliding_window", False):
            sliding = None
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs.update(rope_theta=float(theta), rope_scaling=scaling, sliding_window=sliding)
        kwargs["torch_dtype"] = str(d.get("torch_dtype") or d.get("dtype") or "float32")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in kwargs]
        if missing:
            raise CubelmError(f"config.json lacks required field(s) {', '.join(missing)}")
        return cls(**kwargs)

    def to_hf_dict(self) -> dict:
        d = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": self.hidden_act,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.torch_dtype,
            # both spellings: transformers >= 5 reads rope_parameters, 4.x reads rope_theta / rope_scaling
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rope_parameters": {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta},
        }
        if self.model_type == "llama":
            d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        elif self.model_type == "mistral":
            d.update(sliding_window=self.sliding_window)
        else:
            d.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
                     max_window_layers=self.num_hidden_layers)
        return d

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# Shapes cubelm trains, then the real models' published config.json shapes (planning and loading).
PRESETS: dict[str, dict] = {
    # nano: a distillation student for tiny (~4x fewer parameters, half the depth and width)
    "nano": dict(vocab_size=4096, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 tie_word_embeddings=True, rms_norm_eps=1e-5),
    "tiny": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 tie_word_embeddings=True, rms_norm_eps=1e-5),
    "small": dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048),
    "base": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048),
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, torch_dtype="float16",
                       nominal_params=7e9),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
                       torch_dtype="bfloat16", nominal_params=8e9),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16", nominal_params=1e9),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, sliding_window=4096, bos_token_id=1, eos_token_id=2,
                       torch_dtype="bfloat16", nominal_params=7e9),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643,
                         torch_dtype="bfloat16", nominal_params=0.5e9),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       bos_token_id=151643, eos_token_id=151643, torch_dtype="bfloat16", nominal_params=7e9),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise CubelmError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)} "
                          f"(or pass a model directory / config.json)")
    return ModelConfig(**{**PRESETS[name], **overrides})


def read_config_json(path: str | Path) -> ModelConfig:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise CubelmError(f"{path} does not exist; a model directory needs a config.json "
                          f"(create one with 'cubelm model init' or save_pretrained)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CubelmError(f"{path} is not valid JSON ({e}); fix or regenerate the file") from None
    return ModelConfig.from_hf_dict(data)


def resolve_config(spec: str) -> ModelConfig:
    """A preset name, a model directory or a path to a config.json."""
    if spec in PRESETS:
        return preset(spec)
    p = Path(spec)
    if p.exists():
        return read_config_json(p)
    raise CubelmError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing model "
                      f"directory or config.json")


def param_count_str(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.{1 if n / div < 100 else 0}f}{unit}"
    return str(int(n))


__all__ = ["ModelConfig", "PRESETS", "preset", "read_config_json", "resolve_config", "param_count_str",
           "SUPPORTED_MODEL_TYPES"]
