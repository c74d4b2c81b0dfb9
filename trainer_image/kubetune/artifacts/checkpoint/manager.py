"""CheckpointManager: DeepSpeed checkpoints in S3-compatible storage or a folder, committed by
a manifest written last, verified before resume, rotated after each commit.

Every rank of every node takes part in `save` and `load` (collectives). Each node writes the
DeepSpeed files to its own local disk (`local_dir`): that is all training waits for. Then, in a
background thread per rank, the files of a node are hashed and uploaded in parallel by that
node's ranks, and rank 0 writes `manifest.json` once all ranks reported success (the commit).
At most one upload is in flight: the next `save` (or `wait()`) first joins it and raises its
error. The background threads talk over their own gloo process group, so their collectives
never interleave with the training's. A checkpoint counts only once its manifest is written.

On resume every node downloads the files its own ranks need (the shared files plus its ranks'
ZeRO partitions and RNG states) into its own `local_dir` (files already there with the right
checksum are kept), so a restart on fresh nodes works.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from ...api.progress import utc_now
from ...api.uri import Uri, parse_uri
from ..storage import StorageError, Store, open_store, sha256_file
from .manifest import (
    MANIFEST,
    FileEntry,
    Manifest,
    ManifestError,
    checkpoint_name,
    checkpoint_step,
    file_rank,
    missing_or_wrong,
    parse_manifest,
    plan_rotation,
    trainable_fingerprint,
)
from .retry import RetryPolicy, with_retry
from .rng import load_rng_state, save_rng_state

log = logging.getLogger("kubetune.checkpoint")

UPLOAD_THREADS = 4


class CheckpointError(RuntimeError):
    pass


class CheckpointMismatch(CheckpointError):
    """The checkpoint was written by a run set up differently (an input error: retrying cannot help)."""


class WorldSizeMismatch(CheckpointMismatch):
    """The checkpoint was written by a different number of ranks."""


class TrainableMismatch(CheckpointMismatch):
    """The checkpoint trains other parameters than this run (the method changed since)."""


class NoUsableCheckpoint(CheckpointError):
    """Every checkpoint that was tried failed its checksums."""


def assign_files(files: dict[str, int], ranks: list[int]) -> dict[int, list[str]]:
    """Split files (path -> size) among ranks so each moves about the same number of bytes."""
    load = {r: 0 for r in ranks}
    out: dict[int, list[str]] = {r: [] for r in ranks}
    for path in sorted(files, key=lambda p: (-files[p], p)):
        rank = min(ranks, key=lambda r: (load[r], r))
        out[rank].append(path)
        load[rank] += files[path]
    return out


def trainable_parameters(engine) -> list[tuple[str, tuple[int, ...]]]:
    """(name, full shape) of every trainable parameter (ZeRO-3 partitions count whole)."""
    return [(n, tuple(getattr(p, "ds_shape", None) or p.shape)) for n, p in engine.module.named_parameters() if p.requires_grad]


def has_frozen_parameters(engine) -> bool:
    return any(not p.requires_grad for p in engine.module.parameters())


@contextlib.contextmanager
def frozen_left_out(module):
    """While a lean checkpoint is saved, `module.state_dict()` leaves out every frozen parameter
    under every name it has. DeepSpeed's `exclude_frozen_parameters` drops a frozen parameter
    under its first name only, so one reachable under a second name stayed in: a tied lm_head,
    or the `word_embeddings` that peft's prompt learning registers beside the base model (the
    whole embedding matrix in a P-tuning checkpoint)."""
    frozen = {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def drop(_module, state, prefix, _metadata) -> None:
        for key in [k for k in state if k[len(prefix) :] in frozen]:
            del state[key]

    handle = module.register_state_dict_post_hook(drop)
    try:
        yield
    finally:
        handle.remove()


def _local_files(folder: Path) -> dict[str, int]:
    if not folder.is_dir():
        return {}
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


class CheckpointManager:
    def __init__(
        self,
        uri: str | Uri,
        *,
        keep: int,
        local_dir: str | Path,
        rank: int,
        world_size: int,
        endpoint: Optional[str] = None,
        retry: Optional[RetryPolicy] = None,
        store: Optional[Store] = None,
    ):
        if keep < 1:
            raise ValueError("checkpoint.keep must be >= 1")
        self.uri = uri if isinstance(uri, Uri) else parse_uri(uri)
        self.store = store or open_store(self.uri, endpoint=endpoint)
        self.keep = keep
        self.local_dir = Path(local_dir)
        self.rank = rank
        self.world_size = world_size
        self.retry = retry or RetryPolicy.from_env()
        self.loaded: Optional[str] = None  # the checkpoint the last load() restored
        self._bad: dict[str, str] = {}  # checkpoints that failed checksums in this process
        self._node_keys: Optional[list[tuple[str, str]]] = None
        self._group = None  # the background threads' own process group (world size > 1)
        self._upload: Optional[threading.Thread] = None  # the upload + commit in flight
        self._upload_error: Optional[BaseException] = None
        self.committed: Optional[str] = None  # the newest checkpoint this process committed
        self.committed_time: Optional[str] = None  # ISO 8601 UTC of that commit
        self.commit_seconds: Optional[float] = None  # from the start of its save to its commit

    # ------------------------------------------------------------------ collectives

    def _dist(self):
        if self.world_size <= 1:
            return None
        import torch.distributed as dist

        if not dist.is_initialized():
            raise CheckpointError(f"world size is {self.world_size} but torch.distributed is not initialized")
        return dist

    def _gather(self, obj: Any, group=None) -> list[Any]:
        dist = self._dist()
        if dist is None:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=group)
        return out

    def _from_rank0(self, obj: Any, group=None) -> Any:
        dist = self._dist()
        if dist is None:
            return obj
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0]

    def _background_group(self):
        """Collective on first use: the process group of the upload threads (gloo, any device)."""
        dist = self._dist()
        if dist is not None and self._group is None:
            self._group = dist.new_group(backend="gloo")
        return self._group

    def _barrier(self) -> None:
        dist = self._dist()
        if dist is not None:
            dist.barrier()

    def _node_ranks(self) -> list[int]:
        """Ranks that share this rank's local disk (same host, same local_dir), lowest first."""
        if self._node_keys is None:
            self._node_keys = self._gather((socket.gethostname(), str(self.local_dir.resolve())))
        mine = self._node_keys[self.rank]
        return [r for r, key in enumerate(self._node_keys) if key == mine]

    def _retry(self, what: str, fn, *args):
        return with_retry(self.retry, what, fn, *args)

    # ------------------------------------------------------------------ listing

    def _listing(self) -> dict[str, dict[str, int]]:
        """Stored objects grouped by checkpoint name: name -> {relative path: size}."""
        grouped: dict[str, dict[str, int]] = {}
        for obj in self._retry(f"listing {self.uri}", self.store.list, ""):
            name, _, rest = obj.key.partition("/")
            if rest and checkpoint_step(name) is not None:
                grouped.setdefault(name, {})[rest] = obj.size
        return grouped

    def _read_manifest(self, name: str) -> Manifest:
        raw = self._retry(f"reading {name}/{MANIFEST}", self.store.get_bytes, f"{name}/{MANIFEST}")
        return parse_manifest(raw, name)

    def verify(self, name: str, files: Optional[dict[str, int]] = None) -> tuple[Optional[Manifest], Optional[str]]:
        """(manifest, None) when the checkpoint is complete, else (None, reason)."""
        if name in self._bad:
            return None, self._bad[name]
        files = self._listing().get(name, {}) if files is None else files
        if MANIFEST not in files:
            return None, "incomplete: no manifest.json (the upload did not finish)"
        try:
            manifest = self._read_manifest(name)
        except (ManifestError, FileNotFoundError) as err:
            return None, str(err)
        reason = missing_or_wrong(manifest.files, files)
        return (None, reason) if reason else (manifest, None)

    def _scan(self, log_skipped: bool):
        """Complete checkpoints, newest first (lazily: stops reading manifests when the caller stops)."""
        listing = self._listing()
        for name in sorted(listing, key=lambda n: checkpoint_step(n) or 0, reverse=True):
            _, reason = self.verify(name, listing[name])
            if reason is None:
                yield name
            elif log_skipped:
                self._log_skip(name, reason)

    def _log_skip(self, name: str, reason: str) -> None:
        # Every rank may look; one line per checkpoint is enough.
        level = logging.WARNING if self.rank == 0 else logging.DEBUG
        log.log(level, "skipping checkpoint %s/%s: %s", self.uri, name, reason)

    def latest(self) -> Optional[str]:
        """The newest checkpoint whose manifest verifies (sizes; checksums are checked by load)."""
        return next(self._scan(log_skipped=True), None)

    def checkpoints(self) -> list[str]:
        """Complete checkpoints, newest first."""
        return list(self._scan(log_skipped=False))

    # ------------------------------------------------------------------ save

    def save(self, engine, step: int, client_state: dict[str, Any], wait: bool = True) -> str:
        """Collective: write checkpoint step-STEP to the local disk, then upload and commit it and
        rotate old ones in the background. Every rank must pass the same `wait`.

        Returns once the local files are written (wait=False) or once the checkpoint is
        committed (wait=True). A previous upload still in flight is joined first (at most one
        is in flight) and its error, if any, is raised here on every rank.
        """
        self.wait()
        started = time.monotonic()
        name = checkpoint_name(step)
        stage = self.local_dir / name
        node = self._node_ranks()
        # Validate client_state before any work: it goes into the JSON manifest.
        Manifest(name, step, self.world_size, 0, [], dict(client_state)).to_json()

        error = None
        if self.rank == node[0]:
            shutil.rmtree(stage, ignore_errors=True)
        if self.rank == 0:
            error = self._guard(self._delete_checkpoint, name)  # leftovers of a killed earlier save
        self._raise_if_any(self._gather(error), f"checkpoint {name} could not be started")

        self.local_dir.mkdir(parents=True, exist_ok=True)
        # Lean: frozen weights (a LoRA's base model, ...) are not saved; resume takes them from
        # the model location, as a first start does. DeepSpeed 0.19 leaves them out of the
        # module state and, under ZeRO-2/3, of its frozen-fragment copies; frozen_left_out
        # catches the ones it misses.
        lean = has_frozen_parameters(engine)
        with frozen_left_out(engine.module) if lean else contextlib.nullcontext():
            engine.save_checkpoint(str(self.local_dir), tag=name, save_latest=False, exclude_frozen_parameters=lean)
        save_rng_state(stage / "rng" / f"rank-{self.rank:05d}.pt")
        self._barrier()

        # Who uploads what: each file once, by a rank of the first node that has it.
        listings = self._gather(_local_files(stage) if self.rank == node[0] else None)
        owners: dict[str, int] = {}
        for rank, listing in enumerate(listings):
            for path in listing or {}:
                owners.setdefault(path, rank)
        node_files = {p: s for p, s in (listings[node[0]] or {}).items() if owners[p] == node[0]}
        mine = assign_files(node_files, node)[self.rank]

        manifest = Manifest(name=name, step=step, world_size=self.world_size, zero_stage=int(engine.zero_optimization_stage()),
                            files=[], client_state=dict(client_state), tag=name, frozen_excluded=lean,
                            trainable=trainable_fingerprint(trainable_parameters(engine)))  # fmt: skip
        group = self._background_group()
        self._upload_error = None
        self._upload = threading.Thread(target=self._upload_and_commit, args=(manifest, stage, mine, node, group, started),
                                        name=f"checkpoint-upload-{name}", daemon=True)  # fmt: skip
        self._upload.start()
        if wait:
            self.wait()
        return name

    def wait(self) -> Optional[str]:
        """Join the upload + commit in flight, if any, and raise its error. Returns the newest
        checkpoint this process committed. Every rank must call it (the trainer does before it
        exits, e.g. on SIGTERM, so the checkpoint it just saved is committed)."""
        upload, self._upload = self._upload, None
        if upload is not None:
            upload.join()
            error, self._upload_error = self._upload_error, None
            if error is not None:
                raise error
        return self.committed

    @property
    def uploading(self) -> bool:
        """Whether an upload + commit is in flight (started and not yet joined by wait())."""
        return self._upload is not None and self._upload.is_alive()

    def _upload_and_commit(self, manifest: Manifest, stage: Path, mine: list[str], node: list[int], group, started: float) -> None:
        """Background thread of `save`: upload this rank's share, commit, rotate. Collectives run on
        `group` only. Every rank ends with the same outcome (the errors are gathered first)."""
        try:
            self._commit(manifest, stage, mine, node, group, started)
        except BaseException as err:  # noqa: BLE001 - handed to wait() in the training thread
            self._upload_error = err

    def _commit(self, manifest: Manifest, stage: Path, mine: list[str], node: list[int], group, started: float) -> None:
        name = manifest.name
        entries, error = [], None
        try:
            with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
                entries = list(pool.map(lambda p: self._upload_file(stage, name, p), mine))
        except Exception as err:  # noqa: BLE001 - every rank must learn of it, see below
            error = f"rank {self.rank}: {err}"
        results = self._gather((entries, error), group)
        self._raise_if_any([e for _, e in results], f"checkpoint {name} was not committed")

        error = None
        if self.rank == 0:
            manifest.files = [entry for got, _ in results for entry in got]
            manifest.created = utc_now()
            error = self._guard(self._retry, f"committing {name}/{MANIFEST}", self.store.put_bytes, f"{name}/{MANIFEST}", manifest.to_json())
            if error is None:
                log.info("committed checkpoint %s/%s (%d files, %.1f MB) %.1f s after the save started", self.uri, name, len(manifest.files), manifest.total_bytes / 1e6, time.monotonic() - started)
                self._rotate()
        self._raise_if_any([self._from_rank0(error, group)], f"checkpoint {name} was not committed")
        self.committed, self.committed_time, self.commit_seconds = name, utc_now(), time.monotonic() - started
        if self.rank == node[0]:
            self._drop_local_except(name)

    def _upload_file(self, stage: Path, name: str, path: str) -> FileEntry:
        local = stage / path
        entry = FileEntry(path, local.stat().st_size, sha256_file(local))
        self._retry(f"uploading {name}/{path}", self.store.put_file, local, f"{name}/{path}")
        return entry

    @staticmethod
    def _guard(fn, *args) -> Optional[str]:
        try:
            fn(*args)
            return None
        except StorageError as err:
            return str(err)

    @staticmethod
    def _raise_if_any(errors: list[Optional[str]], what: str) -> None:
        errors = [e for e in errors if e]
        if errors:
            raise StorageError(f"{what}: {'; '.join(errors)}")

    def _delete_checkpoint(self, name: str, files: Optional[dict[str, int]] = None) -> None:
        files = self._listing().get(name, {}) if files is None else files
        if not files:
            return
        # The manifest goes first: a checkpoint is never "complete" with files missing.
        if MANIFEST in files:
            self._retry(f"deleting {name}/{MANIFEST}", self.store.delete, [f"{name}/{MANIFEST}"])
        rest = [f"{name}/{p}" for p in files if p != MANIFEST]
        self._retry(f"deleting {name}", self.store.delete, rest)

    def _rotate(self) -> None:
        """Keep the newest `keep` complete checkpoints; a failure here only costs space."""
        try:
            listing = self._listing()
            doomed = plan_rotation({name: MANIFEST in files for name, files in listing.items()}, self.keep)
            for name in doomed:
                log.info("deleting checkpoint %s/%s (%s)", self.uri, name, "rotation" if MANIFEST in listing[name] else "incomplete leftover")
                self._delete_checkpoint(name, listing[name])
        except StorageError as err:
            log.warning("checkpoint rotation in %s failed, old checkpoints stay until the next save: %s", self.uri, err)

    def _drop_local_except(self, name: str) -> None:
        for child in self.local_dir.iterdir() if self.local_dir.is_dir() else []:
            if child.is_dir() and child.name != name and checkpoint_step(child.name) is not None:
                shutil.rmtree(child, ignore_errors=True)

    # ------------------------------------------------------------------ load

    def load(self, engine, name: str) -> dict[str, Any]:
        """Collective: restore engine state and RNG from `name` and return its client_state.

        Every node downloads the checkpoint to its local disk and checks each file's SHA-256.
        If a file fails its checksum, the checkpoint is skipped (logged with the reason) and
        the next older complete one is loaded instead; `self.loaded` names the one restored.
        """
        self.wait()
        older = lambda n: (checkpoint_step(n) or 0) < (checkpoint_step(name) or 0)  # noqa: E731
        candidates = self._from_rank0([name] + [n for n in self.checkpoints() if older(n)] if self.rank == 0 else None)
        for candidate in candidates:
            manifest = self._read_manifest(candidate)
            self._check_world_size(manifest)
            self._check_trainable(manifest, engine)
            results = self._gather(self._download(manifest, self._needs_every_rank(engine)))
            self._raise_if_any([storage for _, storage in results], f"checkpoint {candidate} could not be downloaded")
            corrupt = [reason for reason, _ in results if reason]
            if corrupt:
                self._bad[candidate] = f"checksum mismatch: {corrupt[0]}"
                self._log_skip(candidate, self._bad[candidate])
                continue
            self._barrier()
            # A lean checkpoint's module state lacks the frozen weights: they stay as loaded.
            path, _ = engine.load_checkpoint(str(self.local_dir), tag=manifest.tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True, load_module_strict=not manifest.frozen_excluded)  # fmt: skip
            if path is None:
                raise CheckpointError(f"DeepSpeed could not load checkpoint {self.uri}/{candidate} from {self.local_dir}")
            load_rng_state(self.local_dir / candidate / "rng" / f"rank-{self.rank:05d}.pt")
            self.loaded = candidate
            log.info("resumed from checkpoint %s/%s (step %d)", self.uri, candidate, manifest.step)
            return dict(manifest.client_state)
        raise NoUsableCheckpoint(f"no checkpoint in {self.uri} passed its checksums (tried {', '.join(candidates)})")

    def resume(self, engine) -> Optional[dict[str, Any]]:
        """Collective: load the newest usable checkpoint; None when there is none."""
        name = self._from_rank0(self.latest() if self.rank == 0 else None)
        if name is None:
            return None
        try:
            return self.load(engine, name)
        except NoUsableCheckpoint as err:
            log.warning("%s; starting from the beginning", err)
            return None

    def _check_world_size(self, manifest: Manifest) -> None:
        # ZeRO partitions optimizer state (stage 3: parameters too) by rank, and the RNG
        # streams and data positions are per rank: resuming is exact only with the same ranks.
        if manifest.world_size != self.world_size:
            raise WorldSizeMismatch(
                f"checkpoint {self.uri}/{manifest.name} was written by {manifest.world_size} ranks "
                f"(ZeRO stage {manifest.zero_stage}) but this run has {self.world_size} ranks. Resume with "
                f"{manifest.world_size} ranks (spec.distributed.nodes x gpusPerNode = {manifest.world_size}), or "
                "point spec.checkpoint.uri at an empty location to start over with the new size."
            )

    def _check_trainable(self, manifest: Manifest, engine) -> None:
        if manifest.trainable and manifest.trainable != trainable_fingerprint(trainable_parameters(engine)):
            raise TrainableMismatch(
                f"checkpoint {self.uri}/{manifest.name} trains other parameters than this job (spec.method changed since "
                "it was written). Restore the method it was written with, or point spec.checkpoint.uri at an empty "
                "location to start over with the new method."
            )

    def _needs_every_rank(self, engine) -> bool:
        """Whether a rank reads other ranks' files on load: ZeRO elastic checkpoints merge every
        partition, and with model or pipeline parallelism the file numbers are not global ranks."""
        elastic = getattr(engine, "zero_elastic_checkpoint", lambda: False)()
        return bool(elastic) or getattr(engine, "dp_world_size", self.world_size) != self.world_size

    def _download(self, manifest: Manifest, every_rank: bool = False) -> tuple[Optional[str], Optional[str]]:
        """Fetch this rank's share of the files its node needs: the shared ones and the ones of the
        node's ranks (ZeRO partitions, RNG), or all with `every_rank`. Returns (checksum problem,
        storage error)."""
        stage = self.local_dir / manifest.name
        node = self._node_ranks()
        needed = [f for f in manifest.files if every_rank or file_rank(f.path) in (None, *node)]
        sizes = {f.path: f.size for f in needed}
        expected = {f.path: f.sha256 for f in needed}
        mine = assign_files(sizes, node)[self.rank]

        def fetch_one(path: str) -> Optional[str]:
            local = stage / path
            if local.is_file() and local.stat().st_size == sizes[path] and sha256_file(local) == expected[path]:
                return None  # already here (written by this node, or downloaded before)
            tmp = local.with_name(local.name + ".part")
            try:
                self._retry(f"downloading {manifest.name}/{path}", self.store.get_file, f"{manifest.name}/{path}", tmp)
            except FileNotFoundError:
                return f"{path} disappeared from storage"
            got = sha256_file(tmp)
            if got != expected[path]:
                tmp.unlink(missing_ok=True)
                return f"{path} has SHA-256 {got[:12]}..., manifest.json says {expected[path][:12]}..."
            os.replace(tmp, local)
            return None

        try:
            with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
                problems = [p for p in pool.map(fetch_one, mine) if p]
        except StorageError as err:
            return None, f"rank {self.rank}: {err}"
        return (problems[0] if problems else None), None
