"""An exported folder, loaded with transformers alone where mlkv cannot be imported (``without_mlkv``), is the same
model: fp32 logits within 1e-5 of mlkv's, the same greedy tokens with the dynamic and the static cache, for the
GPT-NeoX and the Llama flavor with consumer layers; an unsupported transformers is a clear error at load time."""

import pytest
import torch
from exportkit import FLAVORS, needs_tokenizer

from mlkv.model.loading import load_model

pytestmark = needs_tokenizer

#: Runs where mlkv cannot be imported: every exported folder's logits and greedy tokens, saved for the test to compare.
LOAD_AND_RUN = """
import json

import torch
from transformers import AutoModelForCausalLM

inputs = torch.load({inputs!r}, weights_only=True)
outputs, classes = {{}}, {{}}
for flavor, folder in {folders!r}.items():
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    classes[flavor] = type(model).__module__ + "." + type(model).__name__
    with torch.no_grad():
        outputs[flavor] = {{"logits": model(inputs["ids"]).logits,
                           **{{cache: model.generate(inputs["prompt"], do_sample=False, pad_token_id=0,
                                                    cache_implementation=cache, **{generation!r})
                              for cache in ("dynamic", "static")}}}}
torch.save(outputs, {outputs!r})
print(json.dumps({{"classes": classes}}))
"""
GENERATION = {"max_new_tokens": 10, "min_new_tokens": 10}


def mlkv_outputs(folder, inputs: dict) -> dict:
    """The same outputs from mlkv itself, on the folder that was exported."""
    model, _ = load_model(folder, device="cpu")
    with torch.no_grad():
        return {"logits": model(inputs["ids"]).logits,
                **{cache: model.generate(inputs["prompt"], do_sample=False, pad_token_id=0,
                                         cache_implementation=cache, **GENERATION) for cache in ("dynamic", "static")}}


@pytest.fixture(scope="module")
def outputs(converted, exported, without_mlkv, tmp_path_factory):
    """``(mlkv's outputs, the exported folders' outputs, the classes loaded)`` per flavor."""
    root = tmp_path_factory.mktemp("portable_outputs")
    gen = torch.Generator().manual_seed(0)
    inputs = {"ids": torch.randint(0, 50304, (2, 16), generator=gen),
              "prompt": torch.randint(0, 50304, (2, 6), generator=gen)}
    torch.save(inputs, root / "inputs.pt")
    folders = {flavor: str(folder) for flavor, folder in exported.items()}
    loaded = without_mlkv(LOAD_AND_RUN.format(inputs=str(root / "inputs.pt"), folders=folders,
                                              outputs=str(root / "outputs.pt"), generation=GENERATION))
    theirs = torch.load(root / "outputs.pt", weights_only=True)
    ours = {flavor: mlkv_outputs(folder, inputs) for flavor, folder in converted.items()}
    return ours, theirs, loaded["classes"]


def test_import_mlkv_fails_where_the_exported_folders_are_loaded(without_mlkv):
    result = without_mlkv("""
        import json
        try:
            import mlkv
            error = None
        except ImportError as exc:
            error = f"{type(exc).__name__}: {exc}"
        print(json.dumps({"error": error}))
        """)
    assert result["error"] == "ModuleNotFoundError: No module named 'mlkv'"


@pytest.mark.parametrize("flavor", FLAVORS)
def test_the_exported_classes_are_the_folders_own_code(outputs, flavor):
    assert outputs[2][flavor].startswith("transformers_modules.") and \
        outputs[2][flavor].endswith(".modeling_mlkv.MLKVForCausalLM")


@pytest.mark.parametrize("flavor", FLAVORS)
def test_logits_equal_mlkvs_within_1e_5_in_fp32(outputs, flavor):
    ours, theirs, _ = outputs
    diff = (ours[flavor]["logits"] - theirs[flavor]["logits"]).abs().max().item()
    assert diff <= 1e-5, f"{flavor}: max abs logit difference {diff:.2e}"


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("flavor", FLAVORS)
def test_greedy_tokens_equal_mlkvs_with_the_dynamic_and_the_static_cache(outputs, flavor, cache):
    ours, theirs, _ = outputs
    assert torch.equal(ours[flavor]["dynamic"], ours[flavor]["static"])  # mlkv agrees with itself
    assert torch.equal(theirs[flavor][cache], ours[flavor]["dynamic"])
    assert len(set(ours[flavor]["dynamic"][0, -10:].tolist())) > 1  # not one token repeated


def test_an_unsupported_transformers_is_a_clear_error_at_load_time(exported, without_mlkv):
    done = without_mlkv(f"""
        import transformers
        transformers.__version__ = "5.22.1"  # what the check reads: as if an older release were installed
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained({str(exported["llama"])!r}, trust_remote_code=True)
        """, check=False)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "ImportError: transformers 5.22.1 is installed, but this MLKV model code supports transformers>=5.23,<5.25: "
        "pip install 'transformers>=5.23,<5.25'")
