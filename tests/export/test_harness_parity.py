"""lm-evaluation-harness's own ``hf`` backend, given an exported folder with ``trust_remote_code=True`` where mlkv
cannot be imported, scores every request as ``mlkv eval`` scores it on the original folder; and the card of the
export shows ``mlkv eval``'s scores exactly as its results JSON has them."""

import importlib.util
import json

import pytest
from exportkit import FLAVORS, needs_tokenizer

from mlkv.cli import main
from mlkv.export.folder import export_checkpoint
from tiny import CAPITALS_TASK

pytestmark = [needs_tokenizer, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs lm-eval (mlkv[eval])")]

LIMIT = 8
TASK = CAPITALS_TASK  # a multiple-choice task of local files (the harness reads it in both environments)
DOCS = [("France", ["Paris", "Lyon", "Nice"]), ("Japan", ["Tokyo", "Osaka"]), ("Peru", ["Lima", "Cusco"]),
        ("Kenya", ["Nairobi", "Mombasa"]), ("Norway", ["Oslo", "Bergen"]), ("Chile", ["Santiago", "Valparaiso"]),
        ("Egypt", ["Cairo", "Alexandria"]), ("Canada", ["Ottawa", "Toronto", "Montreal"]),
        ("Italy", ["Rome", "Milan"])]
HARNESS = """
import json

import lm_eval
from lm_eval.tasks import TaskManager

scores = {{}}
for flavor, folder in {folders!r}.items():
    out = lm_eval.simple_evaluate(model="hf", model_args={{"pretrained": folder, "trust_remote_code": True,
                                  "dtype": "float32", "device": "cpu"}}, tasks=["capitals"], limit={limit},
                                  task_manager=TaskManager(include_path={tasks!r}), log_samples=True, batch_size=4)
    scores[flavor] = {{s["doc_id"]: s["resps"] for s in out["samples"]["capitals"]}}
print(json.dumps(scores))
"""


@pytest.fixture(scope="module")
def capitals(tmp_path_factory):
    root = tmp_path_factory.mktemp("capitals")
    data = root / "capitals.jsonl"
    data.write_text("".join(json.dumps({"country": c, "choices": ch, "answer": 0}) + "\n" for c, ch in DOCS))
    (root / "tasks").mkdir()
    (root / "tasks" / "capitals.yaml").write_text(TASK.format(data=data))
    return root


def test_the_harness_hf_backend_on_the_export_scores_every_request_as_mlkv_eval(converted, exported, capitals,
                                                                                  without_mlkv):
    ours = {}
    for flavor, folder in converted.items():
        output = capitals / f"{flavor}.json"
        assert main(["eval", str(folder), "--tasks", str(capitals / "tasks" / "capitals.yaml"), "--limit",
                     str(LIMIT), "--log-samples", "--device", "cpu", "--output", str(output)]) == 0
        ours[flavor] = {s["doc_id"]: s["resps"] for s in json.loads(output.read_text())["samples"]["capitals"]}
    theirs = without_mlkv(HARNESS.format(folders={f: str(p) for f, p in exported.items()}, limit=LIMIT,
                                         tasks=[str(capitals / "tasks")]))
    for flavor in FLAVORS:
        assert sorted(ours[flavor]) == list(range(LIMIT))
        for doc_id, requests in ours[flavor].items():  # one [[log-likelihood, greedy]] per choice
            for [[ll, greedy]], [[their_ll, their_greedy]] in zip(requests, theirs[flavor][str(doc_id)], strict=True):
                assert abs(ll - their_ll) <= 1e-5 and greedy == their_greedy, (flavor, doc_id, ll, their_ll)
    # the results of mlkv eval, exported with the model, appear in its card exactly as the JSON has them
    text = (capitals / "gpt_neox.json").read_text()
    dst = export_checkpoint(converted["gpt_neox"], capitals / "export", results=[str(capitals / "gpt_neox.json")])
    card = (dst / "README.md").read_text()
    acc = json.loads(text, parse_float=str)["results"]["capitals"]["acc,none"]
    assert f"| capitals | acc | {acc} |" in card and f'"acc,none": {acc}' in text
