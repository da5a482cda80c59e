import logging
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# The shared test helpers (``tiny.py``) live here; the tests live in folders that mirror the package.
sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_configure(config):
    """Under ``-n N`` each worker gets its share of the cores (and so do the commands it starts): two workers each
    running torch on every core make OpenMP threads wait on each other, and the suite slower."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_runtest_setup(item):
    """The one skip for tests marked ``gpu`` (run with ``pytest -m gpu`` on a GPU machine)."""
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def pytest_collection_modifyitems(items):
    """Modules holding a whole pipeline (``slow``) run first, in their order: under ``-n 2`` the two workers then
    share the long tests, and the short ones fill in behind, instead of one worker finishing a pipeline alone at
    the end. Modules stay whole, so module fixtures are built once per worker."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture(scope="session", autouse=True)
def gguf_cache():
    """One cache of dequantized GGUF models for every test, worker and run on this machine (keyed by the file's
    sha256, the transformers release and mlkv's cache format), instead of the user's own ``~/.cache/mlkv``; an
    ``MLKV_CACHE`` that is set wins."""
    folder = os.environ.get("MLKV_CACHE") or str(Path(tempfile.gettempdir()) / f"mlkv-test-cache-{os.getuid()}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLKV_CACHE", folder)
        yield Path(folder)


@pytest.fixture(scope="module")
def one_thread():
    """Toy matrices: extra threads only add synchronisation (and thrash on a shared CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def pythia_tokenizer():
    """The real Pythia (GPT-NeoX-20B) tokenizer of the shared data folder."""
    from transformers import PreTrainedTokenizerFast

    from mlkv.data.paths import default_data_dir

    tokenizer_file = default_data_dir() / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, pythia_tokenizer):
    """A random 2-layer GPT-NeoX (Pythia vocabulary) saved with the real Pythia tokenizer."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    path = tmp_path_factory.mktemp("tiny_neox")
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=50304, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=256, rotary_pct=0.25)
    GPTNeoXForCausalLM(config).save_pretrained(path)
    pythia_tokenizer.save_pretrained(path)
    return path


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")}


@pytest.fixture
def refused(tmp_path, monkeypatch, capsys, caplog):
    """``refused(argv, message)``: run ``mlkv ARGV`` in ``tmp_path`` and check that it is refused as bad input:
    exit code 2 and one line, ``mlkv CMD: error: ...`` holding ``message``, with no progress bar, log line or output
    before it and nothing written under ``tmp_path``. Returns the line."""
    from mlkv.cli import main

    monkeypatch.chdir(tmp_path)

    def check(argv: list, message: str) -> str:
        before = _files(tmp_path)
        capsys.readouterr()
        caplog.clear()
        with caplog.at_level(logging.INFO):
            code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert (code, out) == (2, ""), err
        assert err.startswith(f"mlkv {argv[0]}: error: ") and err.count("\n") == 1, err
        assert message in err, err
        assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
        assert _files(tmp_path) == before
        return err

    return check
