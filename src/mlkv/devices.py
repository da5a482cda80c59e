"""The ``--device`` of every command, checked before anything loads.

Without this, ``--device cuda`` on a machine without CUDA fails deep inside torch (an ``AssertionError`` or an
``AttributeError`` from ``torch._C``) after the model has loaded; ``check_device`` names the flag and the fix first.
"""

from __future__ import annotations

from mlkv.errors import UsageError

__all__ = ["check_device"]


def check_device(device: str | None, flag: str = "--device") -> None:
    """Raise ``UsageError`` naming ``flag`` when ``device`` is not a torch device or names an accelerator this
    machine does not have (``None``: the command picks one, always fine)."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"{flag} {device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return
    backend = getattr(torch, parsed.type, None)
    if not callable(getattr(backend, "is_available", None)):
        raise UsageError(f"{flag} {device}: torch cannot run models on {parsed.type}; use cpu, cuda or cuda:N")
    if not backend.is_available():
        raise UsageError(f"{flag} {device}: this machine has no {parsed.type.upper()} device "
                         f"(torch.{parsed.type}.is_available() is False); use {flag} cpu or leave {flag} out")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if parsed.index is not None and parsed.index >= count:
        raise UsageError(f"{flag} {device}: this machine has {count} {parsed.type} device(s), "
                         f"{parsed.type}:0 to {parsed.type}:{count - 1}")
