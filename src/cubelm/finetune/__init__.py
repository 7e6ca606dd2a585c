"""Fine-tuning: LoRA and QLoRA adapters applied to a built model from outside, in peft's file format.

``config.LoraConfig`` (peft's field names and defaults), ``lora.apply_lora`` / ``merge_lora`` (the adapter layers),
``adapter`` (``adapter_config.json`` + ``adapter_model.safetensors``, read and written as peft does),
``qlora.apply_qlora`` (the same adapters on an NF4 base, ``cubelm.compress.nf4``), ``lora_commands``
(``cubelm lora merge``).
"""
