"""Your own task YAMLs, checked before the model loads.

lm-evaluation-harness reads a task's YAML only when it builds the task, after the model has loaded, and its errors
name neither the file nor the task: a misspelled key is a ``TypeError`` from ``TaskConfig``, a template naming a
missing field a jinja2 ``UndefinedError``, a ``doc_to_choice`` naming a missing field ``malformed node or string``.
``check_user_tasks`` reads every task YAML of a selection as the harness will (``include:`` merged, ``!function``
left unresolved) and raises ``TaskYamlError`` naming the YAML file, the task and the key for:

* a key the harness does not know (``TaskConfig``'s fields, the group keys, ``include``/``tag``/``task_list``), with
  the nearest known key;
* a local data file (``dataset_kwargs.data_files`` of the ``json``/``csv``/``parquet``/``text`` loaders) that is
  missing, or whose first record cannot be read, or a split the task evaluates that it does not define;
* ``doc_to_text``/``doc_to_target``/``doc_to_choice`` naming a field the documents do not have (a template's
  variables, or ``doc_to_choice``'s plain field name), read from the first document of the evaluated split. A task
  with ``process_docs`` or ``custom_dataset`` makes its documents in code, so its fields are not checked.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import glob
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlkv.errors import UsageError

__all__ = ["TaskYamlError", "check_user_tasks", "check_task_config"]

#: Keys of a task YAML that are not ``TaskConfig`` fields but that the harness reads (structure, Python tasks).
STRUCTURAL_KEYS = frozenset({"include", "tag", "group", "task_list", "class"})
#: ``dataset_path`` values whose ``data_files`` are local files this module can read the first record of.
FILE_LOADERS = ("json", "csv", "parquet", "text")
#: The keys whose string value is a field name or a jinja2 template over the document's fields.
TEMPLATE_KEYS = ("doc_to_text", "doc_to_target", "doc_to_choice")


class TaskYamlError(UsageError):
    """A task YAML the harness would fail on; the message names the file, the task and the key."""


def _known_keys() -> tuple[frozenset[str], frozenset[str]]:
    """(task keys, group keys) that the installed harness accepts."""
    from lm_eval.api.group import GroupConfig
    from lm_eval.api.task import TaskConfig

    task = frozenset(f.name for f in dataclasses.fields(TaskConfig)) | STRUCTURAL_KEYS
    return task, frozenset(f.name for f in dataclasses.fields(GroupConfig)) | task


def check_user_tasks(selection) -> None:
    """Check every task YAML of the user's that ``selection`` (a ``TaskSelection``) runs; see the module doc."""
    from lm_eval.tasks._yaml_loader import load_yaml

    index = selection.manager.task_index if selection.manager is not None else {}
    for spec, name in zip(selection.specs, selection.names):
        if name not in selection.user_names:
            continue
        path = Path(spec) if spec.endswith((".yaml", ".yml")) else getattr(index.get(name), "yaml_path", None)
        if path is not None:
            _check_yaml(Path(path), load_yaml(path, resolve_func=False), index, set())


def _check_yaml(path: Path, config: dict, index: dict, seen: set) -> None:
    """One YAML's config: a group (its keys, then each member it names or defines) or a task (or task list)."""
    if id(config) in seen:
        return
    seen.add(id(config))
    task_keys, group_keys = _known_keys()
    if "group" in config:
        _check_keys(path, config.get("group"), config, group_keys)
        for member in config.get("task") or []:
            if isinstance(member, dict):
                _check_yaml(path, member, index, seen)
            elif getattr(index.get(member), "yaml_path", None) is not None:
                from lm_eval.tasks._yaml_loader import load_yaml

                entry = index[member]
                _check_yaml(Path(entry.yaml_path), load_yaml(entry.yaml_path, resolve_func=False), index, seen)
        return
    if "class" in config:  # a Python task takes its own config
        return
    for task in _tasks_of(config):
        _check_keys(path, task.get("task"), task, task_keys)
        check_task_config(path, task)


def _tasks_of(config: dict) -> Iterator[dict]:
    """The task configs one YAML defines: itself, or each ``task_list`` entry over the shared keys."""
    if "task_list" not in config:
        yield config
        return
    shared = {k: v for k, v in config.items() if k != "task_list"}
    for item in config["task_list"] or []:
        yield {**shared, **item} if isinstance(item, dict) else {**shared, "task": item}


def _error(path: Path, task: Any, key: str, problem: str) -> TaskYamlError:
    return TaskYamlError(f"{path}: task {task}: {key}: {problem}")


def _check_keys(path: Path, task: Any, config: dict, known: frozenset[str]) -> None:
    for key in config:
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {near[0]}?)" if near else " (see lm-eval's task guide for the keys)"
            raise _error(path, task, key, f"not a key of lm-eval's task format{hint}")


def check_task_config(path: Path, config: dict) -> None:
    """A task's data files and the fields its templates name (``config``: the task's merged YAML)."""
    task = config.get("task")
    fields = _first_document_fields(path, task, config)
    if fields is None or "process_docs" in config or "custom_dataset" in config:
        return
    for key in TEMPLATE_KEYS:
        value = config.get(key)
        if not isinstance(value, str) or value in fields:
            continue
        names = _template_fields(value)
        missing = sorted(names - fields)
        if missing:
            raise _error(path, task, key, f"the template names {', '.join(missing)}, which the documents do not "
                                          f"have (fields: {', '.join(sorted(fields))})")
        if key == "doc_to_choice" and not names:
            raise _error(path, task, key, f"{value!r} is not a field of the documents (fields: "
                                          f"{', '.join(sorted(fields))}); give a field holding the choices, a list "
                                          "or a template")


def _template_fields(template: str) -> set[str]:
    """The variables a jinja2 template reads from the document (names jinja2 itself defines excluded)."""
    from jinja2 import meta
    from lm_eval.utils import env

    return set(meta.find_undeclared_variables(env.parse(template))) - set(env.globals)


def _split_files(path: Path, task: Any, config: dict) -> tuple[str, list[str]] | None:
    """(the key naming them, the data files) of the split the task evaluates, or None when they are not local."""
    kwargs = config.get("dataset_kwargs") or {}
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    if config.get("dataset_path") not in FILE_LOADERS or files is None:
        return None
    split_key = "test_split" if config.get("test_split") else "validation_split"
    split = config.get(split_key)
    if isinstance(files, dict):
        if split not in files:
            raise _error(path, task, split_key, f"{split!r} is not a split of dataset_kwargs.data_files (splits: "
                                                f"{', '.join(map(str, files))})")
        key, files = f"dataset_kwargs.data_files.{split}", files[split]
    elif split != "train":
        raise _error(path, task, split_key, f"{split!r} is not a split of dataset_kwargs.data_files: a single "
                                            "file or list is the split 'train'; name the split, e.g. "
                                            f"data_files: {{{split}: FILE}}")
    else:
        key = "dataset_kwargs.data_files"
    return key, [files] if isinstance(files, str) else list(files)


def _first_document_fields(path: Path, task: Any, config: dict) -> set[str] | None:
    """The fields of the evaluated split's first document; every one of its data files checked to exist."""
    found = _split_files(path, task, config)
    if found is None:
        return None
    key, patterns = found
    files = []
    for pattern in patterns:
        if "://" in str(pattern):
            return None  # a URL: read by ``datasets`` itself
        matches = sorted(glob.glob(str(Path(pattern).expanduser()))) if glob.has_magic(str(pattern)) else (
            [str(Path(pattern).expanduser())] if Path(pattern).expanduser().is_file() else [])
        if not matches:
            raise _error(path, task, key, f"{pattern} not found (a relative path starts from the working "
                                          f"directory, {Path.cwd()})")
        files += matches
    try:
        return _record_fields(config["dataset_path"], Path(files[0]), config.get("dataset_kwargs") or {})
    except (OSError, ValueError, csv.Error) as exc:
        raise _error(path, task, key, f"{files[0]}: cannot read its first record ({exc})") from None


def _record_fields(loader: str, file: Path, kwargs: dict) -> set[str] | None:
    """The field names of ``file``'s first record as ``datasets``' ``loader`` reads it (None: cannot tell)."""
    if loader == "text":
        return {"text"}
    if loader == "csv":
        with open(file, newline="", encoding="utf-8") as f:
            return set(next(csv.reader(f), []))
    if loader == "parquet":
        import pyarrow.parquet as pq

        return set(pq.read_schema(file).names)
    if kwargs.get("field") or file.suffix not in (".json", ".jsonl"):
        return None  # records under a field, or a compressed file: read by ``datasets`` itself
    with open(file, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        raise ValueError("the file is empty")
    try:
        record = json.loads(first)
    except json.JSONDecodeError as exc:
        if file.suffix == ".json":
            return None  # one JSON document over several lines: read by ``datasets`` itself
        raise ValueError(f"line 1 is not JSON: {exc.msg}") from None
    if isinstance(record, list) and record and isinstance(record[0], dict):
        return set(record[0])
    if not isinstance(record, dict):
        raise ValueError(f"line 1 is a JSON {type(record).__name__}, not an object of fields")
    return set(record)
