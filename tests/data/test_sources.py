"""Reading documents (mlkv.data.sources): each file format, folders, the hf: route, counters, and errors that name
the file, line and field."""

from __future__ import annotations

import gzip
import json
import lzma

import pytest

from mlkv.data.sources import DataFileError, HFSource, ReadStats, list_source_files, read_documents
from mlkv.data.store import build_token_store
from tinydata import DOCS, write_jsonl, write_parquet


# ---- reading ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.gz", "docs.jsonl.xz", "docs.parquet"])
def test_read_each_record_format(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".parquet"):
        write_parquet(path, DOCS)
    else:
        write_jsonl(path, DOCS, {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open))
    assert list(read_documents(path)) == DOCS
    assert list(read_documents(str(path), max_documents=3)) == DOCS[:3]


def test_read_txt_files_and_folder_sorted_recursive(tmp_path):
    (tmp_path / "b" / "c").mkdir(parents=True)
    (tmp_path / "b" / "c" / "2.txt").write_text(DOCS[2], encoding="utf-8")
    (tmp_path / "b" / "1.txt").write_text(DOCS[1], encoding="utf-8")
    (tmp_path / "a.txt").write_text(DOCS[0], encoding="utf-8")
    with gzip.open(tmp_path / "b" / "c" / "3.txt.gz", "wt", encoding="utf-8") as f:
        f.write(DOCS[3])
    write_jsonl(tmp_path / "z.jsonl", DOCS[4:6])
    (tmp_path / "index.tsv").write_text("ignored\n")
    (tmp_path / "README.md").write_text("ignored\n")
    expected_files = ["a.txt", "b/1.txt", "b/c/2.txt", "b/c/3.txt.gz", "z.jsonl"]
    assert [p.relative_to(tmp_path).as_posix() for p in list_source_files(tmp_path)] == expected_files
    stats = ReadStats()
    assert list(read_documents(tmp_path, stats=stats)) == DOCS[:6]
    assert (stats.files, stats.documents) == (5, 6)


def test_hf_datasets_route_with_local_json(tmp_path, jsonl_file):
    folder = tmp_path / "hf_folder"
    folder.mkdir()
    write_jsonl(folder / "part.jsonl", DOCS[:4])
    assert list(read_documents(f"hf:json@train?data_files={jsonl_file}")) == DOCS
    assert list(read_documents(f"hf:json?data_files={jsonl_file}&streaming=false", max_documents=2)) == DOCS[:2]
    assert list(read_documents(f"hf:{folder}@train")) == DOCS[:4]
    spec = HFSource.parse("hf:wikitext:wikitext-103-raw-v1@validation")
    assert (spec.name, spec.config, spec.split, spec.streaming) == (
        "wikitext",
        "wikitext-103-raw-v1",
        "validation",
        True,
    )
    assert HFSource.parse("hf:EleutherAI/the_pile_deduplicated").split == "train"


def test_hf_route_missing_field(jsonl_file):
    with pytest.raises(ValueError, match=r"row 0: record has no text field 'body' \(keys found: \['id', 'text'\]\)"):
        list(read_documents(f"hf:json@train?data_files={jsonl_file}", text_field="body"))


def test_hf_route_builds_store(tmp_path, jsonl_file, tiny_tokenizer):
    store = build_token_store([f"hf:json@train?data_files={jsonl_file}"], tiny_tokenizer, tmp_path / "cache")
    assert store.num_documents == len(DOCS)


# ---- reading errors --------------------------------------------------------------------------------------------------


def test_error_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="data source not found: .*nope.jsonl"):
        list(read_documents(missing))


def test_error_unreadable_corrupt_file(tmp_path):
    bad = tmp_path / "broken.jsonl.xz"
    bad.write_bytes(b"this is not xz data at all")
    with pytest.raises(OSError, match="cannot read data file .*broken.jsonl.xz"):
        list(read_documents(bad))
    bad_parquet = tmp_path / "broken.parquet"
    bad_parquet.write_bytes(b"not parquet")
    with pytest.raises(OSError, match="cannot read parquet file .*broken.parquet"):
        list(read_documents(bad_parquet))


def test_error_unsupported_file_type(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type: .*table.csv"):
        list(read_documents(path))


def test_error_missing_text_field_names_field_file_line_and_keys(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"content": "oops", "id": 7}\n', encoding="utf-8")
    pattern = r"docs.jsonl, line 2: record has no text field 'text' \(keys found: \['content', 'id'\]\)"
    with pytest.raises(ValueError, match=pattern):
        list(read_documents(path))
    with pytest.raises(ValueError, match=r"docs.parquet: parquet file has no text field 'body' \(columns found"):
        list(read_documents(write_parquet(tmp_path / "docs.parquet", DOCS), text_field="body"))


def test_error_invalid_json_and_non_string_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "trunc\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 3: invalid JSON"):
        list(read_documents(path))
    path.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 1: field 'text' is int, not a string"):
        list(read_documents(path))


@pytest.mark.parametrize("kind", ["empty.jsonl", "empty.txt", "blank.jsonl", "folder"])
def test_error_empty_inputs(tmp_path, tiny_tokenizer, kind):
    path = tmp_path / kind
    if kind == "folder":
        path.mkdir()
        (path / "notes.md").write_text("no data here")
        match = "no data files .* found in folder .*folder"
    else:
        path.write_text("\n\n" if kind.startswith("blank") else "", encoding="utf-8")
        match = f"no documents in .*{kind}"
    with pytest.raises(ValueError, match=match):
        list(read_documents(path))
    with pytest.raises(ValueError, match=match):
        build_token_store([path], tiny_tokenizer, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*/*")) if (tmp_path / "cache").exists() else True


def test_a_few_non_utf8_lines_and_bytes_are_counted_and_skipped(tmp_path, tiny_tokenizer):
    """Under 1 in 100 lines (JSONL) or characters (.txt) undecodable: dropped with a warning and counted."""
    path = tmp_path / "mixed.jsonl"
    good = [json.dumps({"text": DOCS[i % len(DOCS)]}).encode() + b"\n" for i in range(150)]
    path.write_bytes(b"".join(good[:50]) + b'{"text": "bad \xff\xfe byte"}\n' + b"".join(good[50:]))
    stats = ReadStats()
    assert len(list(read_documents(path, stats=stats))) == 150
    assert stats.skipped_lines == 1
    store = build_token_store([path], tiny_tokenizer, tmp_path / "cache")
    assert store.meta["read_stats"]["skipped_lines"] == 1
    txt = tmp_path / "latin1.txt"
    txt.write_bytes(("x" * 200 + " café ok").encode("latin-1"))
    stats = ReadStats()
    assert list(read_documents(txt, stats=stats)) == ["x" * 200 + " caf ok"]
    assert stats.decode_errors == 1


def test_a_file_with_more_than_one_percent_bad_text_is_an_error_naming_it(tmp_path):
    binary = tmp_path / "image.txt"
    binary.write_bytes(bytes(range(256)) * 40)  # a binary file: undecodable bytes and control characters
    with pytest.raises(DataFileError, match=r"image.txt: \d+ of 10240 characters \(\d+\.\d%\) are undecodable "
                                            r"UTF-8 \(\d+\) or binary control characters \(\d+\): not a UTF-8 text "
                                            r"file; convert it to UTF-8, remove it, or pass --allow-bad-text"):
        list(read_documents(binary))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café crème brûlée".encode("latin-1"))  # 4 bad bytes of 17 characters
    with pytest.raises(DataFileError, match=r"latin1.txt: 4 of 17 characters \(23.5%\) are undecodable UTF-8 \(4\)"):
        list(read_documents(latin1))
    assert list(read_documents(latin1, allow_bad_text=True)) == ["caf crme brle"]
    lines = tmp_path / "mostly_bad.jsonl"
    lines.write_bytes(b'{"text": "fine"}\n' + b'{"text": "\xff"}\n' * 3)
    with pytest.raises(DataFileError, match=r"mostly_bad.jsonl: 3 of 4 lines are not valid UTF-8; convert the file "
                                            r"to UTF-8 or pass --allow-bad-text to skip them"):
        list(read_documents(lines))
    assert list(read_documents(lines, allow_bad_text=True)) == ["fine"]
    only_bad = tmp_path / "only_bad.jsonl"  # every line undecodable: allowed, it is still no data
    only_bad.write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"no documents in .*only_bad.jsonl .*'skipped_lines': 1"):
        list(read_documents(only_bad, allow_bad_text=True))


def test_a_jsonl_line_that_is_not_an_object_names_the_file_and_line(tmp_path):
    path = tmp_path / "lists.jsonl"
    path.write_text('{"text": "fine"}\n["a", "list"]\n', encoding="utf-8")
    with pytest.raises(DataFileError, match=r"lists.jsonl, line 2: expected a JSON object with a 'text' field, "
                                            r"got list"):
        list(read_documents(path))


def test_a_truncated_xz_names_the_file_and_the_last_line_read(tmp_path):
    whole = write_jsonl(tmp_path / "whole.jsonl.xz", DOCS * 50, lzma.open).read_bytes()
    cut = tmp_path / "cut.jsonl.xz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataFileError, match=r"cannot read data file .*cut.jsonl.xz after line \d+: Compressed file "
                                            r"ended before the end-of-stream marker was reached; the file is "
                                            r"truncated or corrupt"):
        list(read_documents(cut))
