"""Locations users write in a job: s3://, file://, plain paths, pvc://CLAIM/PATH, hf://ORG/NAME.

Pure parsing, no I/O. Paths that climb out of their root (`..`) are refused where a root
exists (S3 keys, PVC paths) so a job cannot reach another tenant's data.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SCHEMES = ("s3", "file", "pvc", "hf")

# What the bucket/claim/organisation part may be, per scheme (S3 bucket rules, Kubernetes
# object names, hub organisation names); anything else, '..' included, is refused.
_ROOT_NAMES = {
    "s3": (re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$"), "bucket", "an S3 bucket name (a-z, 0-9, '.', '-')"),
    "pvc": (re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"), "claim", "a PersistentVolumeClaim name"),
    "hf": (re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"), "organisation", "an organisation name"),
}


class UriError(ValueError):
    pass


@dataclass(frozen=True)
class Uri:
    scheme: str  # s3 | file | pvc | hf
    bucket: str  # s3 bucket, pvc claim name, hf org; "" for file
    path: str  # key prefix inside the bucket/claim (no leading slash), or the local path for file

    def __str__(self) -> str:
        if self.scheme == "file":
            return f"file://{self.path}"
        return f"{self.scheme}://{self.bucket}/{self.path}" if self.path else f"{self.scheme}://{self.bucket}"

    def join(self, *parts: str) -> "Uri":
        for part in parts:
            _check_relative(part)
        if self.scheme == "file":
            return Uri("file", "", str(Path(self.path, *parts)))
        joined = posixpath.join(self.path, *parts) if self.path else posixpath.join(*parts)
        return Uri(self.scheme, self.bucket, joined)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))


def _check_relative(part: str) -> None:
    if part.startswith("/") or ".." in part.split("/"):
        raise UriError(f"path part {part!r} must be relative and must not contain '..'")


def parse_uri(value: str, base_dir: Optional[str | Path] = None) -> Uri:
    """Parse a location. Plain paths and file:// paths are made absolute against base_dir."""
    if not isinstance(value, str) or not value.strip():
        raise UriError("empty location")
    value = value.strip()
    if "://" not in value:
        scheme, rest = "file", value
    else:
        scheme, rest = value.split("://", 1)
        scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise UriError(f"unsupported scheme {scheme!r} in {value!r}; expected one of s3://, file://, pvc://, hf:// or a path")
    if "\x00" in rest:
        raise UriError(f"NUL byte in location {value!r}")
    if scheme == "file":
        try:
            path = Path(rest).expanduser()
        except RuntimeError:
            raise UriError(f"{value!r} names the home folder of an unknown user") from None
        if not path.is_absolute():
            path = Path(base_dir or ".").resolve() / path
        return Uri("file", "", str(path.resolve()))
    bucket, _, key = rest.partition("/")
    pattern, noun, expected = _ROOT_NAMES[scheme]
    if not bucket:
        raise UriError(f"{value!r} has no {noun} name")
    if ".." in bucket or not pattern.match(bucket):
        raise UriError(f"{value!r}: {bucket!r} is not {expected}")
    key = key.strip("/")
    if ".." in key.split("/"):
        raise UriError(f"{value!r} contains '..'; locations may not climb out of their {'bucket' if scheme == 's3' else 'volume'}")
    if scheme == "hf" and not key:
        raise UriError(f"{value!r} must be hf://ORG/NAME")
    return Uri(scheme, bucket, key)
