"""``mlkv reproduce``: the MLKV paper's experiment end to end at mini scale.

- ``config``: ``Settings`` (the flags), the guard against changing them in a rerun, and the runs they define.
- ``pipeline``: the stages (base, convert, uptrain, eval in a process pool, bench, report) and ``reproduce``.
- ``report``: rows, distillation gap, init comparison, plots and ``report.md``.
- ``command``: the CLI.
"""
