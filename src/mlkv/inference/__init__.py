"""Inference: the decoding engine (``engine``) and its parts, each one concern: the static producer-only cache that
also carries its decode backend (``cache``), the attention backends (``attention``), sampling (``sampling``) and
the checked prompts and stop tokens of a call (``requests``); the Triton kernels (``kernels``); ``mlkv generate``
(``generate``) and ``mlkv bench`` (``bench``)."""
