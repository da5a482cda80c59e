"""The data-folder resolver (mlkv.data.paths)."""

from mlkv.data.paths import default_data_dir


def test_default_data_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("MLKV_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("MLKV_DATA")
    assert default_data_dir().parts[-2:] == ("shared", "data")
