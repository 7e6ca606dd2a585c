"""The networks behind an embedder: token ids (B, T) + attention mask -> hidden states (B, T, H).

Two kinds. BERT-family encoders (bidirectional attention, ``[CLS] ... [SEP]``) run through transformers'
``AutoModel``: cubelm's own model code is decoder-only, and re-implementing BERT would only duplicate what
transformers does exactly (it is the ``rag`` extra's one heavy dependency, imported here only). cubelm's own
decoder models run through ``CausalLM.hidden_states`` with causal attention: with right padding, a real token
never attends to the pads after it, so no attention mask is needed and each row's states equal its unpadded run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cubelm.errors import CubelmError


class HFEncoder:
    """A transformers ``AutoModel`` (BertModel, RobertaModel, ...): last_hidden_state of a padded batch."""

    def __init__(self, model_dir: Path, *, device: torch.device, dtype: torch.dtype, unpad: bool = True):
        try:
            from transformers import AutoModel
            from transformers.utils import logging as hf_logging
        except ImportError:
            raise CubelmError("encoder models need transformers: pip install -e '.[rag]'") from None
        hf_logging.disable_progress_bar()  # "Loading weights" bars would clutter the server's log
        try:
            model = AutoModel.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise CubelmError(f"could not load the encoder in {model_dir} with transformers' AutoModel: "
                              f"{str(e).splitlines()[0][:200]}") from None
        self.model = model.to(device).eval()
        cfg = model.config
        self.hidden_size = int(cfg.hidden_size)
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 512) or 512)
        self.pad_id = int(getattr(cfg, "pad_token_id", None) or 0)
        self.device = device
        from cubelm.rag.unpadded import UnpaddedBert, supports_unpadded
        # BERT-family layouts skip the pads in their dense layers (cubelm.rag.unpadded); others run as they are
        self.unpadded = UnpaddedBert(self.model) if unpad and supports_unpadded(self.model) else None

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.unpadded is not None and not bool(mask.all()):
            return self.unpadded(ids, mask)
        # token_type_ids default to zeros inside the model, as the tokenizer would send for one segment
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state


class DecoderEncoder:
    """A cubelm ``CausalLM`` used as an encoder: the final-norm hidden states (before the LM head)."""

    def __init__(self, model_dir: Path, *, device: torch.device, dtype: torch.dtype):
        from cubelm.model.hf_io import load_model
        self.model = load_model(model_dir, device=device, dtype=dtype)
        cfg = self.model.config
        self.hidden_size = cfg.hidden_size
        self.max_positions = cfg.max_position_embeddings
        self.pad_id = 0  # any id: causal attention keeps pads (always after the real tokens) out of real states
        self.device = device

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.hidden_states(ids)


def is_cubelm_decoder(model_dir: Path) -> bool:
    """True if config.json describes a model cubelm's own decoder reads (llama, mistral, qwen2)."""
    from cubelm.model.config import SUPPORTED_MODEL_TYPES
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CubelmError(f"{model_dir / 'config.json'} is missing or not JSON ({e}); is this a model "
                          f"directory?") from None
    return cfg.get("model_type") in SUPPORTED_MODEL_TYPES
