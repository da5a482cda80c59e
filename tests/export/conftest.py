"""The export tests' fixtures: tiny converted checkpoints, their exports, and ``without_mlkv`` (see exportkit)."""

import json
import textwrap

import pytest
from exportkit import FLAVORS, GUARD, python_without_mlkv, save_tiny_hf


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """``{flavor: MLKV checkpoint folder}``, each converted from a tiny HF model to its plan in ``FLAVORS``."""
    from mlkv.model.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("converted")
    return {flavor: convert_checkpoint(save_tiny_hf(flavor, root / f"{flavor}-hf"), root / flavor, plan=plan)
            for flavor, plan in FLAVORS.items()}


@pytest.fixture(scope="session")
def exported(converted, tmp_path_factory):
    """``{flavor: exported folder}`` of ``converted``."""
    from mlkv.export.folder import export_checkpoint

    root = tmp_path_factory.mktemp("exported")
    return {flavor: export_checkpoint(folder, root / f"{flavor}-portable") for flavor, folder in converted.items()}


@pytest.fixture(scope="module")
def without_mlkv(tmp_path_factory):
    """``run(code)``: run ``code`` where ``import mlkv`` fails (``GUARD`` makes sure) and return the JSON of its last
    stdout line, failing with its stderr if it failed; ``run(code, check=False)`` returns the finished process."""
    workdir = tmp_path_factory.mktemp("without_mlkv")

    def run(code: str, check: bool = True, timeout: float = 300):
        done = python_without_mlkv(GUARD + textwrap.dedent(code), workdir, timeout)
        if not check:
            return done
        assert done.returncode == 0, done.stderr[-4000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    return run
