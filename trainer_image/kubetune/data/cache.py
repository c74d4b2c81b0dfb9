"""Tokenize once: the tokenized dataset of a job, cached beside its checkpoints.

Tokenizing renders every conversation with the chat template several times (tokenize.py), so
on large datasets it takes minutes, and without a cache every rank of every restart paid it
again. The tokens (training and validation samples, and the tokenizing statistics) are kept in
one file per cache key:

    CHECKPOINTS/tokenized/KEY.npz          shared by every node, restart and resume of the job
    KUBETUNE_CACHE_DIR/tokenized/KEY.npz   the node's local copy, what the ranks read

One process per node (local rank 0) finds the local copy (and shares it beside the
checkpoints if it is not there yet), or fetches the shared one, or tokenizes and writes both,
while the node's other ranks wait; they then read the local copy.

The key is a SHA-256 of everything that changes the tokens: the converted examples (so the
data file's content, the columns, the format and the validation split), the tokenizer as the
run loads it (its own `save_pretrained` files: vocabulary, merges, special and added tokens,
chat template), the chat template, the length limits, plain-text mode, this module's FORMAT
and the transformers and tokenizers versions. A changed input is a different key, never a
stale hit. Every file is written to a temporary name and renamed (S3: one PUT), so a
half-written cache is never read; one that fails to load is tokenized again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

from ..artifacts.storage import StorageError, Store
from .loader import Example
from .tokenize import IGNORE, LengthLimits, Sample, TokenizeStats

log = logging.getLogger("kubetune.data")

FORMAT = 1  # bump when tokenize.py gives other tokens for the same inputs
PREFIX = "tokenized"

Tokenized = tuple[list[Sample], TokenizeStats, list[Sample]]  # training samples, their statistics, validation samples


def _hash_examples(digest, examples: list[Example]) -> None:
    for example in examples:
        digest.update(json.dumps([example.source, example.messages], ensure_ascii=False, sort_keys=True).encode())
        digest.update(b"\n")


# How a tokenizer was loaded, which transformers records in the tokenizer_config.json it saves
# (local_files_only follows HF_HUB_OFFLINE): not what it does to text.
LOADING_OPTIONS = ("local_files_only", "is_local", "name_or_path", "cache_dir", "revision", "token", "subfolder", "_commit_hash")


def tokenizer_digest(tokenizer) -> str:
    """SHA-256 of the tokenizer as loaded, through its own save_pretrained files (without the
    loading options its tokenizer_config.json records)."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    with tempfile.TemporaryDirectory(prefix="kubetune-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                digest.update(f"\n{path.relative_to(folder).as_posix()}\n".encode())
                digest.update(_without_loading_options(path) if path.name == "tokenizer_config.json" else path.read_bytes())
    return digest.hexdigest()


def _without_loading_options(path: Path) -> bytes:
    config = json.loads(path.read_text(encoding="utf-8"))
    return json.dumps({k: v for k, v in config.items() if k not in LOADING_OPTIONS}, sort_keys=True).encode()


def cache_key(examples: list[Example], val_examples: list[Example], tokenizer, limits: LengthLimits, plain_text: bool) -> str:
    """The cache key of a tokenization (module doc): equal only for inputs that tokenize alike."""
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    header = {
        "format": FORMAT,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "tokenizer": tokenizer_digest(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "limits": asdict(limits),
        "plain_text": plain_text,
        "examples": [len(examples), len(val_examples)],
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    _hash_examples(digest, examples)
    digest.update(b"\x00validation\x00")
    _hash_examples(digest, val_examples)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# the file: flat arrays (token ids, a trained mask, offsets) and the statistics as JSON


def _flatten(samples: list[Sample], prefix: str) -> dict:
    import numpy as np

    ids = [t for s in samples for t in s.input_ids]
    trained = [label != IGNORE for s in samples for label in s.labels]
    offsets = np.cumsum([0] + [len(s) for s in samples], dtype=np.int64)
    return {f"{prefix}_ids": np.asarray(ids, dtype=np.int32), f"{prefix}_trained": np.asarray(trained, dtype=bool), f"{prefix}_offsets": offsets}


def _samples(arrays, prefix: str) -> list[Sample]:
    import numpy as np

    ids, trained, offsets = arrays[f"{prefix}_ids"], arrays[f"{prefix}_trained"], arrays[f"{prefix}_offsets"]
    labels = np.where(trained, ids, IGNORE)
    return [Sample(ids[a:b].tolist(), labels[a:b].tolist()) for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def write_tokenized(path: Path, tokenized: Tokenized) -> None:
    """Write atomically: a temporary file in the same folder, renamed into place."""
    import numpy as np

    samples, stats, val_samples = tokenized
    arrays = {**_flatten(samples, "train"), **_flatten(val_samples, "validation"), "stats": np.asarray(json.dumps(asdict(stats)))}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_tokenized(path: Path) -> Optional[Tokenized]:
    """The cached tokens, or None when the file is missing or unreadable (then tokenize again)."""
    import numpy as np

    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as arrays:
            stats = TokenizeStats(**json.loads(str(arrays["stats"])))
            return _samples(arrays, "train"), stats, _samples(arrays, "validation")
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as err:
        log.warning("ignoring the unreadable tokenized-data cache %s (%s); tokenizing again", path, err)
        return None


# ---------------------------------------------------------------------------------------
# where the file lives


class TokenCache:
    """The job's tokenized data: the node's local copy, the shared one beside the checkpoints
    (`store` at CHECKPOINTS, None for none), or a new tokenization published to both."""

    def __init__(self, store: Optional[Store], local_dir: Path, once_per_node: Callable = lambda fn, *args: fn(*args)):
        self.store = store
        self.local_dir = Path(local_dir)
        self.once_per_node = once_per_node
        self.source = ""  # where the last get() found the tokens: local, fetched or tokenized

    def get(self, key: str, tokenize: Callable[[], Tokenized]) -> Tokenized:
        """Collective (once_per_node): the tokens of `key`, tokenized only when no copy exists."""
        return self.once_per_node(self._local_fetched_or_built, key, tokenize)

    def _local_fetched_or_built(self, key: str, tokenize: Callable[[], Tokenized]) -> Tokenized:
        local = self.local_dir / f"{key}.npz"
        found = read_tokenized(local)
        if found is not None:
            self.source = "local"
            if not self._shared(key):  # tokenized by another job on this node: share it with this job's nodes
                self._publish(key, local)
            return found
        if self._fetch(key, local):
            found = read_tokenized(local)
            if found is not None:
                self.source = "fetched"
                return found
        tokenized = tokenize()
        write_tokenized(local, tokenized)
        self._publish(key, local)
        self.source = "tokenized"
        return tokenized

    def _shared(self, key: str) -> bool:
        try:
            return self.store is None or self.store.exists(f"{PREFIX}/{key}.npz")
        except StorageError:
            return True  # unknown: leave it; a failure here must not stop training

    def _fetch(self, key: str, local: Path) -> bool:
        if self.store is None:
            return False
        tmp = local.with_name(f".{local.name}.download")
        try:
            self.store.get_file(f"{PREFIX}/{key}.npz", tmp)
        except FileNotFoundError:
            return False
        except StorageError as err:
            log.warning("could not fetch the tokenized data %s/%s/%s.npz (%s); tokenizing here", self.store.root, PREFIX, key, err)
            return False
        os.replace(tmp, local)
        return True

    def _publish(self, key: str, local: Path) -> None:
        """Upload the new tokens (one atomic object) and drop the job's older ones; a failure
        here only costs the next restart a tokenization."""
        if self.store is None:
            return
        try:
            self.store.put_file(local, f"{PREFIX}/{key}.npz")
            stale = [o.key for o in self.store.list(f"{PREFIX}/") if o.key != f"{PREFIX}/{key}.npz"]
            if stale:
                self.store.delete(stale)
        except StorageError as err:
            log.warning("could not store the tokenized data beside the checkpoints (%s); a restart tokenizes again", err)
