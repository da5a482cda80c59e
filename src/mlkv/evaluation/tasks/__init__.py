"""lm-evaluation-harness task configs that read the shared local evaluation files (see ``converters``)."""

from pathlib import Path

#: The folder holding the task YAMLs, for ``lm_eval.tasks.TaskManager(include_path=...)``.
TASKS_DIR = Path(__file__).resolve().parent
