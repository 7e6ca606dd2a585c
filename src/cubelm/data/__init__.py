"""Data: corpus sources, cleaning + dedup, instruct schema and prompt templates, tokenizer training, packing.

The pipeline is ``cubelm data prepare --source stdlib --out DIR``: ``sources`` (read) → ``clean`` (normalize,
filter, dedup; ``report``) → ``tokenizer`` (byte-level BPE, HF format) → ``pack`` (uint16/uint32 memmap shards)
→ ``packed.PackedData`` (what the trainer reads). ``instruct`` and ``stdlib_instruct`` make instruct examples
whose prompt tokens are masked from the loss. Nothing is imported here, so ``import cubelm.data`` stays light.
"""
