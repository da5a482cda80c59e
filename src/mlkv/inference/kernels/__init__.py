"""Custom GPU kernels for inference, each next to its eager fp32 reference.

Importing this package needs only torch: Triton is imported on a kernel's first launch, so a CPU machine without
Triton can import it, and ``supported`` says False there (the engine then keeps SDPA).

* ``decode_attention``: grouped split-K decode attention over a static cache with per-row ``[start, end)``
  (``torch.ops.mlkv.decode_attention``), with ``decode_attention_reference`` and ``supported``.
"""

from mlkv.inference.kernels.decode_attention import (
    MAX_SPLITS,
    choose_num_splits,
    decode_attention,
    decode_attention_reference,
    supported,
)

__all__ = ["MAX_SPLITS", "choose_num_splits", "decode_attention", "decode_attention_reference", "supported"]
