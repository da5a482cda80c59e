"""Tokenizers: a ``tokenizers.Tokenizer`` for the token pipeline (``load_tokenizer``), a transformers tokenizer
for generation and evaluation (``load_hf_tokenizer``), the EOS id appended after every document (``resolve_eos_id``),
and the content hash of a tokenizer's files that keys the token cache (``fingerprint``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tokenizers import Tokenizer

from mlkv.checkpoints import TOKENIZER_FILES
from mlkv.errors import UsageError

#: Token-id EOS candidates, tried in order when the tokenizer dir gives no ``eos_token``.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


class TokenizerFileError(UsageError):
    """A tokenizer file that exists but cannot be read (truncated, corrupt, not a tokenizer); the message names it."""


def _unreadable(files: list[Path], exc: Exception) -> TokenizerFileError:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return TokenizerFileError(f"{', '.join(map(str, files))}: cannot be read as a tokenizer ({reason}); copy the "
                              "tokenizer again from the model it belongs to, or pass another --tokenizer")


def _from_file(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001  (the tokenizers library raises a bare Exception for a bad file)
        raise _unreadable([path], exc) from exc


def _tokenizer_dir_or_file(path_or_dir: str | os.PathLike) -> Path:
    path = Path(path_or_dir).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    return path


def load_tokenizer(path_or_dir: str | os.PathLike) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` file or a dir (checkpoint or tokenizer dir).

    A dir with ``tokenizer.json`` loads that file; a dir with GPT-2 style ``vocab.json`` + ``merges.txt`` builds
    the byte-level BPE; any other dir goes through ``transformers.AutoTokenizer`` (fast tokenizers only).
    """
    path = _tokenizer_dir_or_file(path_or_dir)
    if path.is_file():
        return _from_file(path)
    if (path / "tokenizer.json").is_file():
        return _from_file(path / "tokenizer.json")
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        from tokenizers import ByteLevelBPETokenizer

        return ByteLevelBPETokenizer(str(path / "vocab.json"), str(path / "merges.txt"))._tokenizer
    try:
        from transformers import AutoTokenizer

        backend = AutoTokenizer.from_pretrained(str(path)).backend_tokenizer
    except Exception as exc:  # any failure means "no usable tokenizer here"
        raise ValueError(f"no usable tokenizer in {path} (expected tokenizer.json): {exc}") from exc
    return backend


def load_hf_tokenizer(path_or_dir: str | os.PathLike, eos_token_id: int | None = None):
    """A transformers tokenizer for a checkpoint: ``AutoTokenizer`` where the directory has a full tokenizer setup,
    else a ``PreTrainedTokenizerFast`` around its ``tokenizer.json`` whose EOS (and pad) token is ``eos_token_id``
    (from the model's config), so that generation and lm-evaluation-harness know where documents end."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path_or_dir).expanduser()
    if path.is_dir() and (path / "tokenizer_config.json").is_file():
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:  # noqa: BLE001  (json, tokenizers and transformers errors: the files are unusable)
            raise _unreadable([path / n for n in TOKENIZER_FILES if (path / n).is_file()], exc) from exc
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=load_tokenizer(path))
    if tok.eos_token is None and eos_token_id is not None:
        tok.eos_token = tok.convert_ids_to_tokens(int(eos_token_id))
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def fingerprint(path_or_dir: str | os.PathLike) -> str:
    """sha256 of the tokenizer file(s) content, for the cache key."""
    path = _tokenizer_dir_or_file(path_or_dir)
    files = [path] if path.is_file() else [path / n for n in TOKENIZER_FILES if (path / n).is_file()]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def resolve_eos_id(tokenizer: Tokenizer, tokenizer_path: str | os.PathLike | None = None) -> int:
    """The EOS id: ``eos_token`` of ``tokenizer_config.json`` next to the tokenizer, else a known EOS token."""
    names: list[str] = []
    if tokenizer_path is not None:
        path = Path(tokenizer_path)
        config = (path if path.is_dir() else path.parent) / "tokenizer_config.json"
        if config.is_file():
            eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if isinstance(eos, str):
                names.append(eos)
    for name in [*names, *EOS_CANDIDATES]:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    raise ValueError(
        f"cannot find an EOS token in tokenizer {tokenizer_path} (tried {names + list(EOS_CANDIDATES)}); pass eos_id"
    )


def encode_texts(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (batched: ``encode_batch`` uses all cores)."""
    return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]
