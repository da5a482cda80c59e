"""Offline evaluation of MLKV (or any ``AutoModelForCausalLM``) checkpoints.

- ``perplexity``: token-level sliding-window perplexity and the harness's word/byte perplexity of a text file.
- ``token_budget``: how much of a perplexity file ``--max-tokens`` reads and scores.
- ``tasks``: zero-shot tasks through lm-evaluation-harness on local copies of the data (``task_configs/``), with a
  shared request cache.
- ``task_selection``: what a ``--tasks`` list names (shipped tasks, ``DEFAULT_TASKS``, the paper's ``PAPER_TASKS``,
  task YAML files and folders of your own) and the harness's ``TaskManager`` for them.
- ``harness``: lm-eval's ``HFLM`` with batched scoring and tokenization.
- ``harness_log``: the harness's own log kept out of ``mlkv eval``'s output.
- ``results``: result files, the per-checkpoint and paper tables (one named metric per column), the paper's
  "avg of 4".
- ``model_info``: what a result records about its model (KV cache size, parameters, ...).
- ``command``: ``mlkv eval``.

Models load with ``mlkv.model.loading.load_model``. lm-eval (the ``eval`` extra) is imported only when a task or a
harness-style perplexity runs.
"""
