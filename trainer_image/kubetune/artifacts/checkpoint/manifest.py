"""The checkpoint manifest: the commit marker of a checkpoint (pure, no I/O).

S3 has no atomic rename, so a checkpoint folder is complete only once `manifest.json` exists
in it: the manifest is written after every other file was uploaded and lists each of them
with its size and SHA-256, plus what is needed to judge whether a run can resume from it.

    CHECKPOINTS/step-000000100/mp_rank_00_model_states.pt                (DeepSpeed files,
    CHECKPOINTS/step-000000100/zero_pp_rank_0_mp_rank_00_optim_states.pt  DeepSpeed tag = name)
    CHECKPOINTS/step-000000100/rng/rank-00000.pt                          (per-rank RNG)
    CHECKPOINTS/step-000000100/manifest.json                              (written last)

A lean checkpoint (`frozen_excluded`) holds the trainable parameters, their optimizer state
and the run state only; the frozen weights come from the model location on resume, as on a
first start. `trainable` fingerprints which parameters the checkpoint trains (names and
shapes), so a job whose method changed since is refused instead of loaded halfway.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
NAME_RE = re.compile(r"^step-(\d{9})$")


class ManifestError(ValueError):
    pass


def checkpoint_name(step: int) -> str:
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step-{step:09d}"


def checkpoint_step(name: str) -> Optional[int]:
    """The step of a checkpoint name, or None when the name is not a checkpoint's."""
    match = NAME_RE.match(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the checkpoint folder
    size: int
    sha256: str


@dataclass
class Manifest:
    name: str
    step: int
    world_size: int
    zero_stage: int
    files: list[FileEntry]
    client_state: dict[str, Any] = field(default_factory=dict)
    tag: str = ""  # the DeepSpeed tag (sub-folder) the engine files are under
    created: str = ""
    format: int = FORMAT_VERSION
    frozen_excluded: bool = False  # lean: frozen parameters are not in the files
    trainable: str = ""  # trainable_fingerprint() of the engine that saved it ("" if unknown)

    def to_json(self) -> bytes:
        data = asdict(self)
        data["files"] = files_to_json(self.files)
        try:
            return json.dumps(data, indent=1, sort_keys=True, allow_nan=False).encode()
        except (TypeError, ValueError) as err:
            raise TypeError(f"checkpoint client_state must be plain JSON data (numbers, strings, lists, dicts): {err}") from None

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def trainable_fingerprint(named_shapes: list[tuple[str, tuple[int, ...]]]) -> str:
    """SHA-256 of the trainable parameters' names and shapes, in order."""
    text = "\n".join(f"{name}:{','.join(map(str, shape))}" for name, shape in named_shapes)
    return hashlib.sha256(text.encode()).hexdigest()


def files_to_json(files: list[FileEntry]) -> list[dict[str, Any]]:
    """The `files` list of a manifest (checkpoints and exports), sorted by path."""
    return [asdict(f) for f in sorted(files, key=lambda f: f.path)]


def files_from_json(files: Any) -> list[FileEntry]:
    """Inverse of files_to_json; raises KeyError/TypeError/ValueError on a malformed entry."""
    return [FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in files]


def parse_manifest(raw: bytes | str, name: str) -> Manifest:
    """Parse and check a manifest; raises ManifestError saying what is wrong."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise ManifestError(f"manifest.json is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ManifestError("manifest.json is not a JSON object")
    if data.get("format") != FORMAT_VERSION:
        raise ManifestError(f"manifest.json has format {data.get('format')!r}, this trainer reads format {FORMAT_VERSION}")
    try:
        files = files_from_json(data["files"])
        manifest = Manifest(
            name=str(data["name"]),
            step=int(data["step"]),
            world_size=int(data["world_size"]),
            zero_stage=int(data["zero_stage"]),
            files=files,
            client_state=dict(data.get("client_state") or {}),
            tag=str(data.get("tag") or ""),
            created=str(data.get("created") or ""),
            frozen_excluded=bool(data.get("frozen_excluded", False)),
            trainable=str(data.get("trainable") or ""),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ManifestError(f"manifest.json is missing or has a malformed field: {err}") from None
    if manifest.name != name:
        raise ManifestError(f"manifest.json names checkpoint {manifest.name!r} but lies in {name!r}")
    if not files:
        raise ManifestError("manifest.json lists no files")
    return manifest


# Files that hold one rank's state (DeepSpeed names them by data-parallel rank; the RNG files
# are the manager's own); every other file of a checkpoint is read by all ranks.
_RANK_FILES = (
    re.compile(r"(?:^|/)(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_(?:optim|model)_states\.pt$"),
    re.compile(r"^rng/rank-(\d+)\.pt$"),
)


def file_rank(path: str) -> Optional[int]:
    """The rank whose state a checkpoint file holds (its ZeRO partition or RNG state), or None
    for a file every rank reads (e.g. mp_rank_00_model_states.pt under ZeRO 0-2)."""
    for pattern in _RANK_FILES:
        match = pattern.search(path)
        if match:
            return int(match.group(1))
    return None


def missing_or_wrong(files: list[FileEntry], listing: dict[str, int]) -> Optional[str]:
    """Why the stored files (relative path -> size) do not match a manifest's file entries, or None."""
    for entry in files:
        size = listing.get(entry.path)
        if size is None:
            return f"{entry.path} is listed in manifest.json but missing from storage"
        if size != entry.size:
            return f"{entry.path} has {size} bytes in storage, manifest.json says {entry.size}"
    return None


def plan_rotation(states: dict[str, bool], keep: int) -> list[str]:
    """Checkpoints to delete. `states` maps checkpoint name -> complete (has a manifest).

    Keeps the newest `keep` complete ones; deletes older complete ones and incomplete
    leftovers older than the newest complete one (an incomplete one newer than that may be
    an upload in progress elsewhere, or is replaced when its step is saved again).
    """
    if keep < 1:
        raise ValueError("keep must be >= 1")
    steps = {name: checkpoint_step(name) for name in states}
    complete = sorted((n for n, ok in states.items() if ok and steps[n] is not None), key=lambda n: steps[n], reverse=True)
    if not complete:
        return []
    newest = steps[complete[0]]
    doomed = complete[keep:]
    doomed += [n for n, ok in states.items() if not ok and steps[n] is not None and steps[n] < newest]
    return sorted(doomed)
