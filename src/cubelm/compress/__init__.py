"""Compression: weight formats smaller than the compute dtype.

``nf4`` (4-bit NormalFloat with double-quantized block scales, QLoRA's storage for a frozen base) is here; the
projections it replaces are found through ``cubelm.model.seam``, so the model's ``forward`` never knows.
"""
