"""Offline evaluation of MLKV (or any ``AutoModelForCausalLM``) checkpoints.

- ``perplexity``: token-level sliding-window perplexity and the harness's word/byte perplexity of a text file.
- ``tasks``: zero-shot tasks through lm-evaluation-harness on local copies of the data (``task_configs/``), with a
  shared request cache; ``DEFAULT_TASKS`` and the paper's ``PAPER_TASKS``.
- ``harness``: lm-eval's ``HFLM`` with batched scoring and tokenization.
- ``results``: result files, the per-checkpoint and paper tables, the paper's "avg of 4".
- ``model_info``: what a result records about its model (KV cache size, parameters, ...).
- ``command``: ``mlkv eval``.

Models load with ``mlkv.checkpoints.load_model``. lm-eval (the ``eval`` extra) is imported only when a task or a
harness-style perplexity runs.
"""
