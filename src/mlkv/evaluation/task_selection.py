"""Which tasks a ``--tasks`` list names, and the harness's ``TaskManager`` that knows them.

An item of ``--tasks`` is one of:

* a task mlkv ships with local data (``SUPPORTED_TASKS``, the YAMLs in ``task_configs/``), or with
  ``data_source="hub"`` any task the harness knows;
* a task YAML file (``*.yaml``, ``*.yml``) in lm-eval's task format: the task (or group) it defines is run. The
  file is handed to the harness by path, so its ``include:`` and ``!function`` references resolve beside it;
* a folder of task YAMLs (lm-eval's include path): every task and group its YAMLs define is run (a group's members
  only as part of their group);
* with ``include_path`` (``run_tasks``'s argument, the harness's ``--include_path``): the name of a task defined
  in those folders.

Names are checked before any model is loaded, and an unknown one raises ``UnknownTaskError`` listing what exists.
The local ``TaskManager`` indexes the shipped task copies and the user's folders only (``include_defaults=False``);
the hub one indexes the harness's built-in tasks too (which takes seconds).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlkv.data.paths import default_data_dir
from mlkv.errors import UsageError, require_extra
from mlkv.evaluation.task_configs import TASK_FILES, TASKS_DIR

__all__ = ["DEFAULT_TASKS", "PAPER_TASKS", "SUPPORTED_TASKS", "TaskSelection", "UnknownTaskError", "check_tasks",
           "select_tasks", "task_manager", "yaml_task_name"]

log = logging.getLogger(__name__)

#: Tasks with local copies (``task_configs/*.yaml``), in the harness's names.
SUPPORTED_TASKS: tuple[str, ...] = tuple(TASK_FILES)
#: The MLKV paper's four tasks, in the order of its tables; their mean accuracy is the paper's "avg of 4".
PAPER_TASKS: tuple[str, ...] = ("arc_easy", "lambada_openai", "piqa", "sciq")
#: What ``mlkv eval`` and ``mlkv reproduce`` run by default: the paper's four tasks plus HellaSwag.
DEFAULT_TASKS: tuple[str, ...] = PAPER_TASKS + ("hellaswag",)
#: File name endings that make a ``--tasks`` item a task YAML.
YAML_SUFFIXES = (".yaml", ".yml")


class UnknownTaskError(UsageError):
    """A task name that is not supported; the message lists the supported ones."""


@dataclass(frozen=True)
class TaskSelection:
    """What the harness runs for a ``--tasks`` list."""

    specs: tuple[str, ...]
    """what ``simple_evaluate`` gets: task and group names, and the user's YAML files by path"""
    names: tuple[str, ...]
    """the names the results carry (a YAML file's task or group name), in the order given"""
    include_paths: tuple[Path, ...] = ()
    """the user's task folders, indexed beside the shipped (or built-in) tasks"""
    user_names: frozenset[str] = frozenset()
    """names defined by the user's files and folders (they replace a shipped task of the same name)"""
    manager: Any = field(default=None, compare=False, repr=False)
    """the ``TaskManager`` built to check the names, if one was needed"""

    @property
    def shipped(self) -> list[str]:
        """The names that run mlkv's own local task copies (whose data files ``check_task_files`` checks)."""
        return [n for n in self.names if n in SUPPORTED_TASKS and n not in self.user_names]


def task_manager(data_source: str = "local", data_dir: str | os.PathLike | None = None,
                 include_path: Sequence[str | os.PathLike] = ()):
    """The harness's ``TaskManager``: our local task copies (``"local"``) or the built-in tasks (``"hub"``), plus
    the user's task folders ``include_path``. Local tasks get the data folder as ``mlkv_data_dir`` metadata (the
    keyword argument every ``custom_dataset`` function is called with)."""
    harness_tasks = require_extra("lm_eval.tasks", "zero-shot tasks")
    include = [str(p) for p in include_path]
    if data_source == "hub":
        return harness_tasks.TaskManager(include_path=include or None)
    return harness_tasks.TaskManager(include_path=[str(TASKS_DIR), *include], include_defaults=False,
                                     metadata={"mlkv_data_dir": str(default_data_dir(data_dir).resolve())})


def _ignore_tags(loader, suffix, node):
    """``!function`` and other harness tags, read without resolving them (only the names are wanted)."""
    return None


def yaml_task_name(path: str | os.PathLike) -> str:
    """The task (or group) name a task YAML file defines; ``UsageError`` naming the file if there is none."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"--tasks: task YAML file not found: {path}")

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", _ignore_tags)
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise UsageError(f"--tasks: {path} is not valid YAML: {exc}") from exc
    name = config.get("group") or config.get("task") if isinstance(config, dict) else None
    if not isinstance(name, str) or not name:
        raise UsageError(f"--tasks: {path} defines no task: a task YAML needs a 'task: NAME' (or 'group: NAME') "
                         f"key, in lm-eval's task format")
    return name


def folder_tasks(folder: Path, manager) -> list[str]:
    """The tasks and groups that the YAMLs under ``folder`` define, in the harness's index of ``manager``, less the
    members of a group defined there (they run as part of it). ``UsageError`` if there are none."""
    folder = folder.resolve()
    entries = {name: entry for name, entry in manager.task_index.items()
               if entry.yaml_path is not None and Path(entry.yaml_path).resolve().is_relative_to(folder)
               and entry.kind.name in ("TASK", "PY_TASK", "GROUP")}
    members = {m for e in entries.values() if e.kind.name == "GROUP"
               for m in (e.cfg or {}).get("task", []) if isinstance(m, str)}
    names = sorted(n for n in entries if n not in members)
    if not names:
        raise UsageError(f"--tasks: no task YAML under {folder} (a *.yaml file with a 'task:' or 'group:' key, in "
                         f"lm-eval's task format)")
    return names


def _is_path(item: str) -> bool:
    """A ``--tasks`` item that names a YAML file or a folder rather than a task."""
    return (item.endswith(YAML_SUFFIXES) or "/" in item or os.sep in item
            or (item not in SUPPORTED_TASKS and Path(item).is_dir()))


def _items(tasks: str | Sequence[str]) -> list[str]:
    """``--tasks`` items: comma-separated strings are split (paths with a comma cannot be given)."""
    items = [t.strip() for item in ([tasks] if isinstance(tasks, str) else tasks) for t in str(item).split(",")]
    items = [t for t in items if t]
    if not items:
        raise UnknownTaskError(f"no tasks given; supported: {', '.join(SUPPORTED_TASKS)}")
    return items


def _unknown_message(unknown: list[str], data_source: str, user: set[str]) -> str:
    mine = f"; from your task YAMLs: {', '.join(sorted(user))}" if user else ""
    if data_source == "local":
        return (f"unknown task(s): {', '.join(unknown)}. Supported with local data: {', '.join(SUPPORTED_TASKS)}"
                f"{mine} (any lm-eval task with --data-source hub; your own task: a task YAML file or folder)")
    return f"unknown lm-eval task(s): {', '.join(unknown)}; locally supported: {', '.join(SUPPORTED_TASKS)}{mine}"


def select_tasks(tasks: str | Sequence[str], data_source: str = "local", include_path: Sequence[str | os.PathLike] = (),
                 data_dir: str | os.PathLike | None = None, manager=None) -> TaskSelection:
    """Resolve a ``--tasks`` list (see the module doc) and check every name; ``UnknownTaskError`` lists what exists.

    ``manager``: a ``TaskManager`` to check names against (else one is built when needed: for the hub, or for
    task folders, whose names come from the harness's own index)."""
    if data_source not in ("local", "hub"):
        raise UsageError(f"data_source must be 'local' or 'hub', not {data_source!r}")
    items = _items(tasks)
    folders = [Path(p).expanduser() for p in include_path]
    folders += [Path(i).expanduser() for i in items if _is_path(i) and not i.endswith(YAML_SUFFIXES)]
    for folder in folders:
        if not folder.is_dir():
            raise UsageError(f"--tasks: no such task YAML file or folder: {folder}")
    if manager is None and (folders or data_source == "hub"):
        manager = task_manager(data_source, data_dir, folders)
    specs, names, user, plain = [], [], set(), []
    for item in items:
        if item.endswith(YAML_SUFFIXES):
            name = yaml_task_name(item)
            specs.append(str(Path(item).expanduser().resolve()))
            names.append(name)
            user.add(name)
        elif _is_path(item):
            found = folder_tasks(Path(item).expanduser(), manager)
            specs += found
            names += found
            user.update(found)
        else:
            specs.append(item)
            names.append(item)
            plain.append(item)
    for folder in folders:  # names a folder defines, run or not, belong to the user
        user.update(n for n, e in manager.task_index.items() if e.yaml_path is not None
                    and Path(e.yaml_path).resolve().is_relative_to(folder.resolve()))
    known = set(manager.all_tasks) if data_source == "hub" else set(SUPPORTED_TASKS)
    unknown = [n for n in plain if n not in known and n not in user]
    if unknown:
        raise UnknownTaskError(_unknown_message(unknown, data_source, user))
    for name in sorted(user & set(SUPPORTED_TASKS)):
        log.warning("task %r from your task YAMLs replaces mlkv's local copy of it", name)
    return TaskSelection(tuple(specs), tuple(names), tuple(folders), frozenset(user), manager)


def check_tasks(tasks: str | Sequence[str], data_source: str = "local", manager=None,
                include_path: Sequence[str | os.PathLike] = ()) -> list[str]:
    """The names of a ``--tasks`` list (comma-separated strings are split), checked: ``select_tasks(...).names``.

    With ``data_source="local"`` and no task folder, plain names are checked against ``SUPPORTED_TASKS`` without
    importing the harness; with ``"hub"`` against every task the harness knows (``manager``: a ``TaskManager`` to
    ask, else one is built, which takes seconds)."""
    return list(select_tasks(tasks, data_source, include_path, manager=manager).names)
