"""lm-evaluation-harness task configs that read the shared local evaluation files (see ``converters``).

This package holds the task YAMLs (for ``lm_eval.tasks.TaskManager(include_path=TASKS_DIR)``) and the converters
their ``custom_dataset`` entries call; the tables below say which shared files each task reads and which split its
YAML evaluates. Importing it needs neither lm-eval nor ``datasets``.
"""

from pathlib import Path

#: The folder holding the task YAMLs, for ``lm_eval.tasks.TaskManager(include_path=...)``.
TASKS_DIR = Path(__file__).resolve().parent

#: Files (relative to the data folder) that each task reads.
TASK_FILES: dict[str, tuple[str, ...]] = {
    "lambada_openai": ("eval/lambada_openai/lambada_test.jsonl",),
    "piqa": ("eval/piqa/valid.jsonl", "eval/piqa/valid-labels.lst"),
    "arc_easy": ("eval/arc_easy/arc_easy_test.llmfoundry.jsonl",),
    "hellaswag": ("eval/hellaswag/hellaswag_val.jsonl",),
    "sciq": ("eval/sciq/sciq_test.jsonl",),
    "boolq": ("eval/boolq/boolq_dev.llmfoundry.jsonl",),
    "openbookqa": ("eval/openbookqa/openbookqa_test.llmfoundry.jsonl",),
    "wikitext": ("eval/wikitext2/wiki.test.raw",),
}

#: The split each task's YAML evaluates (the same split as the harness's task).
TASK_SPLITS: dict[str, str] = {
    "lambada_openai": "test",
    "piqa": "validation",
    "arc_easy": "test",
    "hellaswag": "validation",
    "sciq": "test",
    "boolq": "validation",
    "openbookqa": "test",
    "wikitext": "test",
}
