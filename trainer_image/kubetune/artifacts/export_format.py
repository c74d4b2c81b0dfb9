"""The export format: what makes a folder of model or adapter files a complete KubeTune export.

An export is complete only once its manifest `.kubetune-export.json` says so: `publish_dir`
first writes it as unfinished (`"complete": false`), uploads the files, deletes the earlier
export's leftovers, and writes it last with every file's size and SHA-256 (the checkpoint
manifest's file list). A re-export that dies halfway thus leaves a folder marked unfinished,
never a silent mix of old and new files.

`check_export` is what a reader runs on its local copy before using it, once per load: the
merge step (on the adapter), the server (on what it serves) and the model cache (on a model
source, model_source.py). Folders KubeTune did not export (a base model) have no manifest
and are used as they are.

Writers are in export.py (the trained weights, the merged model); this module imports no
torch, so every reader can afford it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from ..api.progress import utc_now
from ..api.uri import Uri
from .checkpoint.manifest import FileEntry, files_from_json, files_to_json, missing_or_wrong
from .checkpoint.retry import RetryPolicy, with_retry
from .storage import open_store, sha256_file

log = logging.getLogger("kubetune.export")

EXPORT_MANIFEST = ".kubetune-export.json"
EXPORT_FORMAT = 1


class IncompleteExport(RuntimeError):
    """An export that a writer did not finish, or whose files do not match its manifest."""


def export_manifest(files: list[FileEntry], complete: bool) -> bytes:
    data = {"format": EXPORT_FORMAT, "complete": complete, "files": files_to_json(files), "created": utc_now()}
    return json.dumps(data, indent=1, sort_keys=True).encode()


def publish_dir(local: str | Path, target: Uri, endpoint: Optional[str] = None) -> None:
    """Upload a folder to target (s3:// or a folder) as a complete export (see module doc):
    manifest marked unfinished, files, removal of an earlier export's other files, manifest
    with every file's size and SHA-256 written last."""
    local = Path(local)
    files = [FileEntry(p.relative_to(local).as_posix(), p.stat().st_size, sha256_file(p)) for p in sorted(local.rglob("*")) if p.is_file()]
    if any(f.path == EXPORT_MANIFEST for f in files):
        raise ValueError(f"{local} already holds an {EXPORT_MANIFEST}; publish the model files only")
    store = open_store(target, endpoint=endpoint)
    policy = RetryPolicy.from_env()
    before = {o.key for o in with_retry(policy, f"listing {target}", store.list, "")}
    with_retry(policy, f"marking {target} unfinished", store.put_bytes, EXPORT_MANIFEST, export_manifest([], complete=False))
    written = set(with_retry(policy, f"uploading to {target}", store.put_dir, local, ""))
    stale = sorted(before - written - {EXPORT_MANIFEST})
    if stale:
        with_retry(policy, f"deleting stale files in {target}", store.delete, stale)
    with_retry(policy, f"committing {target}/{EXPORT_MANIFEST}", store.put_bytes, EXPORT_MANIFEST, export_manifest(files, complete=True))
    log.info("wrote %s (%d files)", target, len(written))


def check_export(folder: str | Path, location: str = "") -> bool:
    """Check a local copy of a model or adapter folder before using it. True: a complete
    KubeTune export whose files match its manifest (sizes and SHA-256). False: a folder without
    an export manifest (not written by KubeTune's export, e.g. a base model); use it as it is.
    Raises IncompleteExport for an unfinished export or files that do not match."""
    folder = Path(folder)
    where = location or str(folder)
    marker = folder / EXPORT_MANIFEST
    if not folder.is_dir() or not marker.is_file():
        return False
    try:
        data = json.loads(marker.read_text())
        if data.get("format") != EXPORT_FORMAT:
            raise IncompleteExport(f"{where}: {EXPORT_MANIFEST} has format {data.get('format')!r}, this version reads {EXPORT_FORMAT}")
        complete, files = data["complete"], files_from_json(data["files"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise IncompleteExport(f"{where}: {EXPORT_MANIFEST} is unreadable ({err}); export it again") from None
    if complete is not True:
        raise IncompleteExport(f"{where} is an unfinished export (the run writing it stopped halfway); export it again")
    listing = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    reason = missing_or_wrong(files, listing)
    if reason is None:
        reason = next((f"{f.path} does not match its SHA-256 in {EXPORT_MANIFEST}" for f in files if sha256_file(folder / f.path) != f.sha256), None)
    if reason:
        raise IncompleteExport(f"{where} is not the export its manifest describes: {reason.replace('manifest.json', EXPORT_MANIFEST)}")
    return True
