"""The model card (``README.md``) of an exported checkpoint, written from what its folder records and nothing else.

``read_facts`` gathers the folder's ``config.json``, its weights' shapes, its records (``mlkv.model.provenance``:
conversion, training, the base model behind them) and its evaluation results (``eval_results*.json``); in the
records and results, numbers with a fraction are kept as the text the files hold, so every score appears exactly as
its results JSON has it.
``model_card`` renders them: the sharing plan (structure, producers, the per-layer source map), KV bytes per token
against the original's, how the model was made, the evaluations, a loading snippet and the base's license. What a
folder does not record, the card says is not recorded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlkv.model.compat import transformers_requirement
from mlkv.model.provenance import TRAINING_RECORD, read_record, recorded_conversion
from mlkv.model.sharing import SharingPlan
from mlkv.tables import markdown_table

NOT_RECORDED = "not recorded"
#: A training record's ``start`` in words.
_START = {"random": "a random initialisation", "checkpoint": "a checkpoint", None: "a start not recorded"}


@dataclass
class Facts:
    """What an exported folder records, as its files hold it."""

    name: str
    config: dict[str, Any]
    parameters: int
    conversion: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    license: str | None = None
    license_from: str = NOT_RECORDED

    @property
    def plan(self) -> SharingPlan:
        c = self.config
        return SharingPlan(tuple(c["kv_source_layers"]), c["num_key_value_heads"], c["num_attention_heads"])

    @property
    def base(self) -> dict[str, Any] | None:
        return (self.conversion or {}).get("base")


def weight_count(folder: Path) -> int:
    """Parameters stored in the folder's safetensors files (a tied head is stored once)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                numel = 1
                for size in f.get_slice(key).get_shape():
                    numel *= size
                total += numel
    return total


def read_facts(folder: Path, name: str, license: str | None = None) -> Facts:
    """The facts of an exported ``folder``, to be published as ``name``; ``license`` is the base's license given
    at export, used where the records state none (``mlkv.export.folder`` refuses one that contradicts them)."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    training = read_record(folder, TRAINING_RECORD, exact=True)
    conversion = recorded_conversion(folder, exact=True)
    results = {p.name: json.loads(p.read_text(encoding="utf-8"), parse_float=str)
               for p in sorted(folder.glob("eval_results*.json"))}
    facts = Facts(name, config, weight_count(folder), conversion, training, results)
    recorded = (facts.base or {}).get("license")
    if recorded:
        facts.license, facts.license_from = recorded, "recorded with the base model"
    elif license:
        facts.license, facts.license_from = license, "given at export"
    return facts


# ---- sections -------------------------------------------------------------------------------------------------------
def front_matter(facts: Facts) -> str:
    """The Hub's metadata block: the license only when known."""
    lines = ["---"] + ([f"license: {facts.license}"] if facts.license else [])
    lines += ["library_name: transformers", "pipeline_tag: text-generation", "tags:", "- mlkv", "- kv-cache", "---"]
    return "\n".join(lines)


def intro(facts: Facts) -> str:
    plan = facts.plan
    return (f"# {facts.name}\n\nAn MLKV model (Multi-Layer Key-Value sharing): {len(plan.consumers)} of its "
            f"{plan.num_layers} layers attend to the keys and values of an earlier layer, so its KV cache holds "
            f"{plan.num_producers} layers' K/V heads instead of {plan.num_layers}. It loads with transformers alone "
            f"({transformers_requirement()}): the modeling code is in this folder, generated from mlkv's own "
            "source, and runs with `trust_remote_code=True`.")


def _served(plan: SharingPlan) -> list[list[str]]:
    return [[str(p), ", ".join(map(str, plan.served_by(p)))] for p in plan.producers]


def sharing_section(facts: Facts) -> str:
    plan, c = facts.plan, facts.config
    lines = ["## Sharing plan", "",
             f"- structure: **{plan.structure}** ({plan.num_producers} producer layers x {plan.num_key_value_heads} "
             f"K/V head{'s' if plan.num_key_value_heads > 1 else ''} each; {plan.num_attention_heads} query heads "
             "per layer)",
             f"- producers (the layers that compute K/V): {', '.join(map(str, plan.producers))}",
             f"- per-layer source map, `kv_source_layers` (layer i attends to the K/V of layer i's entry): "
             f"`{list(plan.kv_source_layers)}`", "", markdown_table(_served(plan), ["producer", "layers it serves"]),
             "", kv_line(facts, plan.kv_bytes_per_token(c["head_dim"], "fp16"))]
    return "\n".join(lines)


def kv_line(facts: Facts, ours: int) -> str:
    """KV bytes per token in fp16, against the original's where the conversion recorded it."""
    line = f"- KV cache: **{ours:,} bytes per token** in fp16"
    original = (facts.conversion or {}).get("source_kv_bytes_per_token_fp16")
    if original is None:
        return line + "; the original's: " + ("none (trained from a random initialisation)"
                                              if (facts.training or {}).get("start") == "random" else NOT_RECORDED)
    structure = facts.conversion.get("source_structure", NOT_RECORDED)
    return line + f"; the original ({structure}): {original:,} bytes per token, {original / ours:.1f}x as many"


def architecture_section(facts: Facts) -> str:
    c = facts.config
    keys = ("flavor", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rope_parameters",
            "tie_word_embeddings", "dtype")
    rows = [[f"`{k}`", json.dumps(c[k]) if isinstance(c[k], (dict, list, bool)) else str(c[k])]
            for k in keys if k in c]
    rows.append(["parameters", f"{facts.parameters:,}"])
    return "## Architecture\n\n" + markdown_table(rows, ["field", "value"])


def _base_line(facts: Facts) -> str:
    base = facts.base
    if base is None:
        if (facts.training or {}).get("start") == "random":
            return "- base model: none; trained from a random initialisation (below)"
        return f"- base model: {NOT_RECORDED}"
    named = " ".join(str(base[k]) for k in ("name", "organization") if base.get(k))
    line = f"- base model: {named + ', ' if named else ''}from `{base.get('source', NOT_RECORDED)}`"
    trained = base.get("training")
    if trained:
        start = _START.get(trained.get("start"), _START[None])
        line += f"; itself trained by mlkv from {start}: {_training_words(trained)}"
    return line


def _conversion_line(facts: Facts) -> str:
    c = facts.conversion
    if c is None:
        return f"- conversion: {NOT_RECORDED}"
    return (f"- conversion: `mlkv convert` of `{c.get('source')}` to plan `{c.get('plan')}` ({c.get('structure')}), "
            f"init **{c.get('init')}** (how each producer's K/V projections combine those of the layers it serves), "
            f"keep_params {c.get('keep_params')}")


def _training_words(t: dict[str, Any]) -> str:
    words = f"objective **{t.get('objective')}**"
    if t.get("teacher"):
        words += (f" (teacher `{t['teacher']}`, alpha {t.get('distill_alpha')}, hidden-state weight "
                  f"{t.get('distill_hidden')}, temperature {t.get('distill_temperature')})")
    data = ", ".join(f"`{d}`" for d in t.get("data") or []) or NOT_RECORDED
    words += (f", **{t.get('tokens'):,} tokens** in {t.get('steps'):,} steps of sequences of {t.get('seq_len')} "
              f"tokens, peak learning rate {t.get('lr')}, seed {t.get('seed')}; data: {data}")
    val = t.get("validation") or {}
    if val:
        held_out = ", ".join(f"`{d}`" for d in t.get("val_data") or []) or "a held-out fraction of the data"
        words += "; last validation: " + ", ".join(f"{k} {v}" for k, v in val.items()) + f" on {held_out}"
    return words


def _training_line(facts: Facts) -> str:
    t = facts.training
    if t is None:
        made = "none: these are the conversion's weights" if facts.conversion else NOT_RECORDED
        return f"- training: {made}"
    start = _START["random"] if t.get("start") == "random" else "the model above"
    line = f"- training (`mlkv train`, from {start}): {_training_words(t)}"
    if t.get("earlier_training"):
        line += f"; that model had been trained before: {_training_words(t['earlier_training'])}"
    return line


def provenance_section(facts: Facts) -> str:
    return "\n".join(["## How it was made", "", _base_line(facts), _conversion_line(facts), _training_line(facts)])


# ---- evaluation -----------------------------------------------------------------------------------------------------
def _task_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if filt and not metric.endswith("_stderr"):
                stderr = metrics.get(f"{metric}_stderr,{filt}", "")
                rows.append([task, metric if filt == "none" else f"{metric} ({filt})", str(value), str(stderr)])
    return rows


def _perplexity_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, entry in (results.get("mlkv") or {}).get("perplexity", {}).items():
        token = entry.get("token_level") or {}
        if "perplexity" in token:
            rows.append([name, f"token perplexity (window {token.get('max_length')}, stride {token.get('stride')})",
                         str(token["perplexity"])])
        for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
            if metric in (entry.get("document_level") or {}):
                rows.append([name, metric, str(entry["document_level"][metric])])
    return rows


def _results_block(name: str, results: dict[str, Any]) -> str:
    info = results.get("mlkv") or {}
    dtype = (info.get("evaluated_on") or {}).get("dtype") or info.get("dtype", NOT_RECORDED)
    lines = [f"### `{name}`", "", f"- model dtype {dtype}"]
    tasks, ppl = _task_rows(results), _perplexity_rows(results)
    if tasks:
        limit = info.get("limit")
        scope = f"the first {limit} documents of each task" if limit else "the full task sets"
        lines[-1] += f"; {scope}, through lm-evaluation-harness {info.get('lm_eval_version', NOT_RECORDED)}"
        lines += ["", markdown_table(tasks, ["task", "metric", "value", "stderr"])]
    if ppl:
        lines += ["", markdown_table(ppl, ["text", "metric", "value"])]
    return "\n".join(lines)


def evaluation_section(facts: Facts) -> str:
    if not facts.results:
        return "## Evaluation\n\nNo evaluation recorded."
    blocks = [_results_block(name, results) for name, results in facts.results.items()]
    return "## Evaluation\n\nScores as the results files in this folder hold them (`mlkv eval`).\n\n" + \
        "\n\n".join(blocks)


# ---- use, license ---------------------------------------------------------------------------------------------------
def usage_section(facts: Facts) -> str:
    return f"""## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "{facts.name}"  # this folder, or its Hub id once uploaded
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)  # reads the config too
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
ids = tokenizer("The old house", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=20, do_sample=False)[0]))
```

With lm-evaluation-harness:

```bash
lm_eval --model hf --model_args pretrained={facts.name},trust_remote_code=True --tasks piqa
```

Needs {transformers_requirement()} and torch; mlkv is not needed."""


def license_section(facts: Facts) -> str:
    if facts.license:
        return f"## License\n\nThe base model's license: **{facts.license}** ({facts.license_from})."
    return (f"## License\n\nThe base model's license: {NOT_RECORDED}. Check the base model's terms before sharing "
            "this model.")


def model_card(facts: Facts) -> str:
    """The whole card, section by section."""
    sections = (front_matter(facts), intro(facts), sharing_section(facts), architecture_section(facts),
                provenance_section(facts), evaluation_section(facts), usage_section(facts), license_section(facts))
    return "\n\n".join(sections) + "\n"
