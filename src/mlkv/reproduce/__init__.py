"""``mlkv reproduce``: the MLKV paper's experiment end to end, from a base pretrained here or a real checkpoint.

- ``source``: the base (``--base pretrain``, ``smollm2``, a ``.gguf`` file or a folder) and its shape.
- ``config``: ``Settings`` (the flags), each pipeline's defaults, the checks, the guard against changing them in a
  rerun.
- ``runs``: the uptraining runs, step-0 evaluations and task-bearing models, named; the inits skipped as the same
  function.
- ``pipeline``: the stages (base, convert, uptrain, eval, bench, report) and ``reproduce``; ``evaluate``: the
  evaluation stage's process pool; ``log``: progress lines and stage markers.
- ``report`` (rows, init comparison, ``results.json``), ``findings`` (the paper's findings and the distillation gap
  by stated rules), ``plots``, ``markdown`` (``report.md``).
- ``command``: the CLI.
"""
