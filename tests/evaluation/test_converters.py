"""The local task copies' converters (``mlkv.evaluation.task_configs.converters``) on the real shared data files."""

import pytest

from mlkv.data.paths import default_data_dir
from mlkv.evaluation.task_configs import TASK_SPLITS, converters

DATA = default_data_dir()
if not (DATA / "eval").is_dir() or not (DATA / "tokenizers" / "gpt-neox-20b" / "tokenizer.json").is_file():
    pytest.skip(f"shared data folder not found ({DATA}); set MLKV_DATA", allow_module_level=True)

EXPECTED = {
    "lambada_openai": (5153, {"text"}),
    "piqa": (1838, {"goal", "sol1", "sol2", "label"}),
    "arc_easy": (2376, {"question", "choices", "answerKey"}),
    "hellaswag": (10042, {"activity_label", "ctx_a", "ctx_b", "ctx", "endings", "label"}),
    "sciq": (1000, {"question", "distractor1", "distractor2", "distractor3", "correct_answer", "support"}),
    "boolq": (3270, {"passage", "question", "label"}),
    "openbookqa": (500, {"question_stem", "choices", "answerKey"}),
    "wikitext": (62, {"page"}),
}


@pytest.mark.parametrize("task", list(EXPECTED))
def test_converter_counts_and_fields(task):
    docs = converters.READERS[task](DATA)
    count, fields = EXPECTED[task]
    assert len(docs) == count
    assert all(set(doc) == fields for doc in docs)
    if "choices" in fields:
        assert all(doc["answerKey"] in doc["choices"]["label"] for doc in docs)
        assert all(len(doc["choices"]["text"]) == len(doc["choices"]["label"]) for doc in docs)
    dataset = converters.load_task_dataset(task, DATA)
    assert list(dataset) == [TASK_SPLITS[task]] and len(dataset[TASK_SPLITS[task]]) == count


def test_converter_values():
    piqa = converters.read_piqa(DATA)
    assert piqa[0]["goal"] == "How do I ready a guinea pig cage for it's new occupants?" and piqa[0]["label"] == 0
    assert {d["label"] for d in piqa} == {0, 1}
    arc = converters.read_arc_easy(DATA)[0]
    assert arc["question"] == "Which statement best explains why photosynthesis is the foundation of most food webs?"
    assert arc["answerKey"] == "A" and arc["choices"]["label"] == ["A", "B", "C", "D"]
    padded = [d for d in converters.read_arc_easy(DATA) if len(d["choices"]["text"]) == 3]
    assert len(padded) == 7  # llm-foundry's repeated distractor dropped
    puppy = next(d for d in padded if d["question"] == "A male puppy inherits traits from")
    assert puppy["choices"]["text"] == ["its mother, only", "both parents", "its father, only"]
    assert puppy["answerKey"] == "B"
    boolq = converters.read_boolq(DATA)[0]
    assert boolq["question"] == "does ethanol take more energy make that produces" and boolq["label"] == 0
    assert boolq["passage"].startswith("All biomass goes through") and "\nQuestion" not in boolq["passage"]
    pages = converters.read_wikitext(DATA)
    assert pages[0]["page"].startswith(" = Robert Boulter = \n")
    assert all(p["page"].lstrip().startswith("= ") for p in pages)


def test_hellaswag_query_split():
    split = converters.split_hellaswag_query
    assert split("Roof shingle removal: A man is sitting on a roof. he") == {
        "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
        "ctx": "A man is sitting on a roof. he"}
    wikihow = split("Family Life: How to keep a pacifier. Install mesh netting inside the crib.")
    assert wikihow["ctx_b"] == ""
    assert wikihow["ctx_a"] == "How to keep a pacifier. Install mesh netting inside the crib."
    assert split("Canoeing: two people paddle")["ctx_b"] == "two people paddle"


def test_wikitext_split_matches_document_level_rules():
    raw = " \n = A = \n \n text a \n = = Sub = = \n more \n = B = \n text b \n"
    assert converters.split_wikitext_documents(raw) == [
        " = A = \n \n text a \n = = Sub = = \n more ", " = B = \n text b \n"]
