"""``mlkv export``: what the exported folder holds, the model card written from the folder's records, and the errors
(not an MLKV checkpoint, an existing or busy destination, no tokenizer, results that are not results, a license that
contradicts the records)."""

import json

import pytest
from exportkit import needs_tokenizer

from mlkv.files import FolderInUseError, folder_lock
from mlkv.model.loading import load_model
from mlkv.cli import main
from mlkv.errors import UsageError
from mlkv.evaluation.results import save_results
from mlkv.export.bundle import AUTO_MAP
from mlkv.export.folder import NotAnMLKVCheckpointError, export_checkpoint

pytestmark = needs_tokenizer

#: An evaluation result as ``mlkv eval`` writes one, its numbers with more digits than a float's shortest form needs
#: in JSON text ("0.50" is kept as "0.50": the card shows the file's text).
RESULTS = """{"results": {"piqa": {"alias": "piqa", "acc,none": 0.50, "acc_stderr,none": 0.2886751345948129,
  "acc_norm,none": 0.75, "acc_norm_stderr,none": 0.25}},
 "mlkv": {"limit": 4, "lm_eval_version": "0.4.13", "dtype": "float32",
  "perplexity": {"wikitext2": {"token_level": {"perplexity": 51234.56789, "max_length": 128, "stride": 64}}}}}"""


def test_the_exported_folder_holds_weights_config_code_tokenizer_records_and_card(exported):
    names = {p.name for p in exported["llama"].iterdir()}
    assert {"model.safetensors", "config.json", "configuration_mlkv.py", "modeling_mlkv.py", "mlkv_compat.py",
            "mlkv_flavors.py", "mlkv_sharing.py", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "mlkv_conversion.json", "README.md"} == names
    config = json.loads((exported["llama"] / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["model_type"] == "mlkv"
    assert config["kv_source_layers"] == [0, 0, 2, 2] and config["num_key_value_heads"] == 2
    model, _ = load_model(exported["llama"], device="cpu")  # where mlkv is installed, its own classes load it
    assert type(model).__module__ == "mlkv.model.modeling"


def test_the_card_names_the_plan_its_kv_bytes_against_the_originals_and_says_no_evaluation(exported):
    card = (exported["gpt_neox"] / "README.md").read_text()
    assert "- structure: **2x1** (2 producer layers x 1 K/V head each; 4 query heads per layer)" in card
    assert "- producers (the layers that compute K/V): 0, 2" in card
    assert "`kv_source_layers` (layer i attends to the K/V of layer i's entry): `[0, 0, 2, 2]`" in card
    assert "| 0 | 0, 1 |\n| 2 | 2, 3 |" in card
    # 2 producers x 1 head x head_dim 8 x K and V x 2 bytes, against 4 layers x 4 heads
    assert "- KV cache: **64 bytes per token** in fp16; the original (4x4): 512 bytes per token, 8.0x as many" in card
    assert "init **pairwise**" in card and "- training: none: these are the conversion's weights" in card
    assert "## Evaluation\n\nNo evaluation recorded." in card
    assert "The base model's license: not recorded." in card and "license:" not in card.split("---")[1]
    assert f'path = "{exported["gpt_neox"].name}"' in card and "trust_remote_code=True" in card


def test_the_card_shows_every_score_exactly_as_the_results_json_has_it(converted, tmp_path):
    results = tmp_path / "piqa_limit4.json"
    results.write_text(RESULTS)
    dst = export_checkpoint(converted["llama"], tmp_path / "out", results=[str(results)], license="apache-2.0")
    card = (dst / "README.md").read_text()
    assert (dst / "eval_results_piqa_limit4.json").read_text() == RESULTS
    assert "| piqa | acc | 0.50 | 0.2886751345948129 |\n| piqa | acc_norm | 0.75 | 0.25 |" in card
    assert "| wikitext2 | token perplexity (window 128, stride 64) | 51234.56789 |" in card
    assert "- model dtype float32; the first 4 documents of each task, through lm-evaluation-harness 0.4.13" in card
    assert card.startswith("---\nlicense: apache-2.0\n")
    assert "The base model's license: **apache-2.0** (given at export)." in card


def test_eval_results_in_the_checkpoint_folder_go_into_the_card_by_default(converted, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(converted["gpt_neox"], src)
    save_results(json.loads(RESULTS), src / "eval_results_limit4.json")
    card = (export_checkpoint(src, tmp_path / "out") / "README.md").read_text()
    assert "### `eval_results_limit4.json`" in card and "| piqa | acc | 0.5 |" in card  # as save_results wrote it


def test_a_folder_that_is_not_an_mlkv_checkpoint_is_a_named_error(converted, tmp_path, capsys):
    hf = converted["llama"].parent / "llama-hf"
    with pytest.raises(NotAnMLKVCheckpointError, match=r"not an MLKV checkpoint \(config.json's model_type is "
                                                       r"'llama', not 'mlkv'\); make one first: mlkv convert"):
        export_checkpoint(hf, tmp_path / "out")
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "not an MLKV checkpoint (no config.json in it)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_existing_destination_needs_overwrite_and_a_busy_one_is_refused(converted, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="out already exists; pass --overwrite to replace it"):
        export_checkpoint(converted["llama"], dst)
    with folder_lock(dst, "another writer"), pytest.raises(FolderInUseError, match=r"in use by .*another writer"):
        export_checkpoint(converted["llama"], dst, overwrite=True)
    assert (dst / "old.txt").is_file()
    assert main(["export", str(converted["llama"]), str(dst), "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["dst"] == str(dst)
    assert not (dst / "old.txt").exists() and (dst / "modeling_mlkv.py").is_file()


def test_missing_tokenizer_bad_results_and_a_contradicting_license_are_refused_before_writing(converted, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(converted["llama"], src, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(UsageError, match=r"SRC .*src: no tokenizer files .*pass --tokenizer DIR"):
        export_checkpoint(src, tmp_path / "out")
    (tmp_path / "other.json").write_text('{"loss": 1}')
    with pytest.raises(UsageError, match=r"--results .*other.json: not an evaluation results file"):
        export_checkpoint(converted["llama"], tmp_path / "out", results=[str(tmp_path / "other.json")])
    record = json.loads((src / "mlkv_conversion.json").read_text())
    (src / "mlkv_conversion.json").write_text(json.dumps({**record, "base": {"source": "x", "license": "mit"}}))
    with pytest.raises(UsageError, match=r"--license apache-2.0: the checkpoint records the base model's license as "
                                         r"'mit'; leave --license out"):
        export_checkpoint(src, tmp_path / "out", tokenizer=str(converted["llama"]), license="apache-2.0")
    assert not (tmp_path / "out").exists()
    card = (export_checkpoint(src, tmp_path / "out", tokenizer=str(converted["llama"])) / "README.md").read_text()
    assert "The base model's license: **mit** (recorded with the base model)." in card
