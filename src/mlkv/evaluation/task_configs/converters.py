"""Local copies of the zero-shot evaluation sets, in the document schema of lm-evaluation-harness's own tasks.

The task YAMLs next to this file are copies of lm-eval 0.4.13's task YAMLs whose dataset comes from
``custom_dataset: !function mlkv.evaluation.task_configs.converters.load_<task>`` instead of the Hugging Face hub.
Each loader reads the shared data folder (``eval/...``, see the shared ``README.md``) and returns a
``datasets.DatasetDict`` whose split (the one the YAML evaluates) holds documents with exactly the fields of the hub
dataset that the harness's task reads, so the harness's own ``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice`` /
``process_docs`` build the prompts.

The harness calls a ``custom_dataset`` with the task's ``metadata`` as keyword arguments;
``mlkv.evaluation.tasks.task_manager`` puts the data folder there as ``mlkv_data_dir``. Without it, the folder is
``mlkv.data.paths.default_data_dir()`` (``$MLKV_DATA``, else ``../shared/data`` from the working directory, else from
the repository root). The readers need only the standard library; ``datasets`` is imported when a loader runs.

Conversions (shared file -> hub schema):

* ``lambada_openai``: ``{text}`` as is (the file is the harness's own test file).
* ``piqa``: ``valid.jsonl`` ``{goal, sol1, sol2}`` + ``valid-labels.lst`` -> ``label`` (int).
* ``arc_easy``: llm-foundry ``{query: "Question: ...", choices, gold}`` -> ``question``, ``choices``
  ``{text, label: A, B, ...}``, ``answerKey``; the distractor llm-foundry repeated to pad 3-choice questions (7 of
  them) is dropped. The original choice labels (``A``-``E`` or ``1``-``5``) are not in the file; they only name the
  gold choice, which keeps its position.
* ``hellaswag``: ``{query: "<activity_label>: <ctx>", choices, gold}`` -> ``activity_label``, ``ctx_a``,
  ``ctx_b``, ``ctx``, ``endings``, ``label`` (str, as on the hub); the harness's ``process_docs`` then builds
  ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``. The file's query is already
  preprocessed and lost the ``ctx_a``/``ctx_b`` boundary, which matters because the harness capitalizes ``ctx_b``:
  it is rebuilt as the trailing sentence fragment (ActivityNet items end in an unfinished sentence such as
  ``"... on a roof. he"``; WikiHow items end with a full sentence and have an empty ``ctx_b``). See
  ``split_hellaswag_query``.
* ``sciq``: the file is in the hub schema (``question, distractor1..3, correct_answer, support``).
* ``boolq``: llm-foundry ``{query: "Passage: <passage>\\nQuestion: <question>?", choices: [no, yes], gold}`` ->
  ``passage``, ``question`` (without the ``?`` llm-foundry appended), ``label``.
* ``openbookqa``: llm-foundry ``{query: <question_stem>, choices, gold}`` -> ``question_stem``, ``choices``
  ``{text, label: A-D}``, ``answerKey``.
* ``wikitext``: ``wiki.test.raw`` -> ``{page}`` documents, split exactly as the ``EleutherAI/wikitext_document_level``
  dataset (which the harness's ``wikitext`` task reads) splits the raw file; see ``split_wikitext_documents``.

"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlkv.data.paths import data_file
from mlkv.errors import require_extra
from mlkv.evaluation.task_configs import TASK_FILES, TASK_SPLITS

if TYPE_CHECKING:
    import datasets


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _choice_labels(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


# ----------------------------------------------------------------------------------------------------------
# Per-task readers: shared file -> list of documents in the hub schema
# ----------------------------------------------------------------------------------------------------------


def read_lambada_openai(data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """LAMBADA (OpenAI) test: ``{text}``; the harness's target is the last space-separated word."""
    return [{"text": row["text"]} for row in _read_jsonl(data_file(data_dir, TASK_FILES["lambada_openai"][0]))]


def read_piqa(data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """PIQA validation: ``{goal, sol1, sol2, label}`` with the label from ``valid-labels.lst``."""
    rows = _read_jsonl(data_file(data_dir, TASK_FILES["piqa"][0]))
    labels_path = data_file(data_dir, TASK_FILES["piqa"][1])
    labels = labels_path.read_text(encoding="utf-8").split()
    if len(labels) != len(rows):
        raise ValueError(f"{labels_path} has {len(labels)} labels for {len(rows)} PIQA questions")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(label)}
            for r, label in zip(rows, labels)]


def _strip_prefix(text: str, prefix: str, where: str) -> str:
    if not text.startswith(prefix):
        raise ValueError(f"{where}: expected the text to start with {prefix!r}, got {text[:60]!r}")
    return text[len(prefix):]


def read_arc_easy(data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """ARC-Easy test: llm-foundry rows -> ``{question, choices: {text, label}, answerKey}``.

    llm-foundry padded the 3-choice questions to 4 by repeating a distractor; the repeat is dropped, which gives
    back the original choices (a repeated wrong choice changes neither acc nor acc_norm, only the request count).
    """
    path = data_file(data_dir, TASK_FILES["arc_easy"][0])
    docs = []
    for i, row in enumerate(_read_jsonl(path)):
        gold_text = row["choices"][int(row["gold"])]
        choices = list(dict.fromkeys(row["choices"]))  # first occurrences, in order
        labels = _choice_labels(len(choices))
        docs.append({
            "question": _strip_prefix(row["query"], "Question: ", f"{path} line {i + 1}"),
            "choices": {"text": choices, "label": labels},
            "answerKey": labels[choices.index(gold_text)],
        })
    return docs


#: The end of the last complete sentence in a HellaSwag context: ., ! or ? (optionally closed by a quote or
#: bracket) followed by whitespace.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")
_COMPLETE_END = re.compile(r"[.!?][\"')\]]*$")


def split_hellaswag_query(query: str) -> dict[str, str]:
    """Rebuild HellaSwag's ``activity_label``, ``ctx_a``, ``ctx_b`` and ``ctx`` from ``"<label>: <ctx>"``.

    ``ctx_b`` is the unfinished sentence at the end of the context (empty when the context ends with a
    complete sentence), ``ctx_a`` everything before it. Activity labels contain no ``": "``.
    """
    activity_label, sep, ctx = query.partition(": ")
    if not sep:
        raise ValueError(f"HellaSwag query without 'activity label: ': {query[:80]!r}")
    if _COMPLETE_END.search(ctx):  # ends with a complete sentence: none of the ending's words are in ctx
        ctx_a, ctx_b = ctx, ""
    else:
        last = None
        for last in _SENTENCE_END.finditer(ctx):
            pass
        cut = last.end() if last else 0
        ctx_a, ctx_b = ctx[:cut].rstrip(), ctx[cut:]
    return {"activity_label": activity_label, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx}


def read_hellaswag(data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """HellaSwag validation: ``{query, choices, gold}`` -> ``{activity_label, ctx_a, ctx_b, ctx, endings, label}``."""
    docs = []
    for row in _read_jsonl(data_file(data_dir, TASK_FILES["hellaswag"][0])):
        doc = split_hellaswag_query(row["query"])
        doc["endings"] = list(row["choices"])
        doc["label"] = str(int(row["gold"]))  # the hub stores the label as a string
        docs.append(doc)
    return docs


def read_sciq(data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """SciQ test: already in the hub schema."""
    fields = ("question", "distractor1", "distractor2", "distractor3", "correct_answer", "support")
    return [{k: row[k] for k in fields} for row in _read_jsonl(data_file(data_dir, TASK_FILES["sciq"][0]))]


def read_boolq(data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """BoolQ dev: llm-foundry rows -> ``{passage, question, label}`` (label 1 = yes)."""
    path = data_file(data_dir, TASK_FILES["boolq"][0])
    docs = []
    for i, row in enumerate(_read_jsonl(path)):
        if list(row["choices"]) != ["no", "yes"]:
            raise ValueError(f"{path} line {i + 1}: expected choices ['no', 'yes'], got {row['choices']}")
        body = _strip_prefix(row["query"], "Passage: ", f"{path} line {i + 1}")
        passage, sep, question = body.rpartition("\nQuestion: ")
        if not sep:
            raise ValueError(f"{path} line {i + 1}: no '\\nQuestion: ' in the query")
        docs.append({"passage": passage, "question": question.removesuffix("?"), "label": int(row["gold"])})
    return docs


def read_openbookqa(data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """OpenBookQA test: llm-foundry rows -> ``{question_stem, choices: {text, label}, answerKey}``."""
    docs = []
    for row in _read_jsonl(data_file(data_dir, TASK_FILES["openbookqa"][0])):
        labels = _choice_labels(len(row["choices"]))
        docs.append({
            "question_stem": row["query"],
            "choices": {"text": list(row["choices"]), "label": labels},
            "answerKey": labels[int(row["gold"])],
        })
    return docs


def split_wikitext_documents(raw_text: str) -> list[str]:
    """Split a raw WikiText file into articles, as the ``EleutherAI/wikitext_document_level`` dataset does.

    That dataset (the ``page`` field read by the harness's ``wikitext`` task) splits the file on ``"\\n"`` and
    starts a new page at every top-level heading line ``" = Title = "`` (a line that, with ``"= = ="`` and
    ``"= ="`` collapsed to ``"==="`` / ``"=="`` and stripped, starts with ``"= "`` and ends with ``" ="``).
    Lines are joined back with ``"\\n"``; a page that is only whitespace (the file's leading blank line) is
    dropped, and the text after the last heading is always a page. WikiText-2's test file gives 62 pages.
    """
    pages, lines = [], []
    for line in raw_text.split("\n"):
        collapsed = line.replace("= = =", "===").replace("= =", "==").strip()
        if collapsed.startswith("= ") and collapsed.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return pages


def read_wikitext_pages(path: str | os.PathLike) -> list[str]:
    """The article pages of a raw WikiText file (see ``split_wikitext_documents``)."""
    with open(path, encoding="utf-8") as f:  # text mode, as the dataset script reads it
        return split_wikitext_documents(f.read())


def read_wikitext(data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """WikiText-2 (raw) test: ``{page}`` documents."""
    return [{"page": page} for page in read_wikitext_pages(data_file(data_dir, TASK_FILES["wikitext"][0]))]


READERS: dict[str, Callable[[str | os.PathLike | None], list[dict[str, Any]]]] = {
    "lambada_openai": read_lambada_openai,
    "piqa": read_piqa,
    "arc_easy": read_arc_easy,
    "hellaswag": read_hellaswag,
    "sciq": read_sciq,
    "boolq": read_boolq,
    "openbookqa": read_openbookqa,
    "wikitext": read_wikitext,
}


# ----------------------------------------------------------------------------------------------------------
# custom_dataset entry points (called by the harness with the task's metadata as keyword arguments)
# ----------------------------------------------------------------------------------------------------------


def load_task_dataset(task: str, mlkv_data_dir: str | os.PathLike | None = None) -> datasets.DatasetDict:
    """The converted documents of ``task`` as ``DatasetDict({<split the YAML evaluates>: Dataset})``."""
    datasets = require_extra("datasets", "the local evaluation tasks")
    return datasets.DatasetDict({TASK_SPLITS[task]: datasets.Dataset.from_list(READERS[task](mlkv_data_dir))})


def _loader(task: str) -> Callable[..., datasets.DatasetDict]:
    """The ``custom_dataset`` function of ``task``'s YAML: ``load_task_dataset`` with the data folder the harness
    passes in the task's metadata (the other metadata fields are ignored)."""
    def load(mlkv_data_dir=None, **_metadata) -> datasets.DatasetDict:
        return load_task_dataset(task, mlkv_data_dir)

    load.__name__ = load.__qualname__ = f"load_{task}"
    return load


load_lambada_openai = _loader("lambada_openai")
load_piqa = _loader("piqa")
load_arc_easy = _loader("arc_easy")
load_hellaswag = _loader("hellaswag")
load_sciq = _loader("sciq")
load_boolq = _loader("boolq")
load_openbookqa = _loader("openbookqa")
load_wikitext = _loader("wikitext")
