"""Hashed (pseudonymous) volume ids: the key beside the store, the ids, the id -> source map.

Volume ids (``data.id_scheme``): ``source`` keeps the case names of the files/folders (right for
public datasets such as ACDC's ``patientNNN``). ``hashed`` makes them pseudonymous for clinical
exports whose folders are named after the patient: ``v`` + the first 12 hex digits of
HMAC-SHA256(key, case name) (a 4D frame suffix ``_frameNN`` is kept, so folds still group a
patient's frames). The key is random, made on the first hashed run and kept NEXT TO the store, in
``<store>.idkey``, never inside it: with the key in the store, anyone holding the store could
confirm a guessed name (``DOE_JOHN_19700101``) by hashing it. The same key gives the same ids on
every re-run, so only changed sources are converted again; the manifest holds only a check value
of the key, so a lost or different key stops the run instead of silently renaming everything.
The mapping back to the sources is written only to ``<store>.idmap.csv``, also next to the store
(``id,source,label``, layout-relative paths); keep both files with the raw data, and share the
store alone. In hashed mode the summary and failure lines name a volume by its hashed id and the
layout folder it came from (``imagesTr/v1a2b...``); any source path or case name in a failure
reason is replaced the same way.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from pcl_hpc.atomic import atomic_path
from pcl_hpc.data import layouts
from pcl_hpc.data import store as zstore
from pcl_hpc.errors import UserError

ID_SCHEMES = ("source", "hashed")


def id_key_path(store_path: str | Path) -> Path:
    """Where the id key of a hashed store is kept: beside the store, never inside it."""
    return Path(str(store_path).rstrip("/\\") + ".idkey")


def id_map_path(store_path: str | Path) -> Path:
    """The hashed id -> source mapping, beside the store (keep it with the raw data)."""
    return Path(str(store_path).rstrip("/\\") + ".idmap.csv")


def key_check(key: bytes) -> str:
    return hmac.new(key, b"pcl-hpc volume id key check", hashlib.sha256).hexdigest()[:16]


def hashed_id(key: bytes, vid: str) -> str:
    """``v`` + 12 hex digits of HMAC-SHA256(key, case name); a ``_frameNN`` suffix is kept."""
    case = zstore.patient_id(vid)
    return "v" + hmac.new(key, case.encode("utf-8"), hashlib.sha256).hexdigest()[:12] + vid[len(case):]


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (replacing it atomically)."""
    with atomic_path(path, mode=0o600) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)


def load_id_key(store_path: str) -> bytes:
    """The store's id key: read from ``<store>.idkey``, or made for a store that has no hashed ids yet."""
    path = id_key_path(store_path)
    try:
        previous = zstore.read_manifest(store_path)["settings"]
    except UserError:
        previous = {}
    if path.is_file():
        try:
            key = bytes.fromhex(path.read_text().strip())
        except ValueError:
            key = b""
        if len(key) < 16:
            raise UserError(f"id key file {path} is damaged; restore it from a backup, or preprocess into a new store")
    elif previous.get("id_key_check"):
        raise UserError(
            f"store {store_path} has hashed volume ids but their key file {path} is missing; restore it "
            "(it is kept beside the store), or preprocess into a new store"
        )
    else:
        key = secrets.token_bytes(32)
        _write_private(path, key.hex() + "\n")
    if previous.get("id_key_check") not in (None, key_check(key)):
        raise UserError(
            f"id key file {path} is not the key store {store_path} was built with; restore the right one, "
            "or preprocess into a new store"
        )
    return key


class Pseudonyms:
    """Hashed ids for the jobs, and the scrubbing of source paths / case names out of report lines."""

    def __init__(self, key: bytes, raw: Path, jobs: list[layouts.Job]):
        self.key, self.raw = key, raw
        self.tokens: dict[str, str] = {}  # source path -> "folder/hashed id"
        self.names: dict[str, str] = {}  # case name -> hashed id
        self.rows: list[tuple[str, str, str]] = []
        for job in jobs:
            source_ids = job.vids
            job.outputs = [(hashed_id(key, vid), t) for vid, t in job.outputs]
            hid = zstore.patient_id(job.outputs[0][0]) if job.outputs else ""
            self.tokens[job.image] = self._folder(job.image) + hid
            if job.label:
                self.tokens[job.label] = self._folder(job.label) + hid + "(label)"
            for vid, (new, _) in zip(source_ids, job.outputs):
                self.names[vid] = new
                self.names.setdefault(zstore.patient_id(vid), zstore.patient_id(new))
                self.rows.append((new, self._rel(job.image), self._rel(job.label) if job.label else ""))
            for p in (job.image, job.label):
                if p:
                    stem = layouts.split_ext(Path(p).name)
                    self.names.setdefault(stem[0] if stem else Path(p).name, hid)

    def _rel(self, path: str) -> str:
        try:
            return Path(path).relative_to(self.raw).as_posix()
        except ValueError:
            return Path(path).name

    def _folder(self, path: str) -> str:
        parent = Path(self._rel(path)).parent.as_posix()
        return "" if parent == "." else parent + "/"

    def token(self, path: str) -> str:
        if path in self.tokens:
            return self.tokens[path]
        rel = self._rel(path)
        tok = "p" + hmac.new(self.key, rel.encode("utf-8"), hashlib.sha256).hexdigest()[:12]
        self.rows.append((tok, rel, ""))
        stem = layouts.split_ext(Path(path).name)
        stem = stem[0] if stem else Path(path).name
        for name in (stem, re.sub(r"_\d{4}$", "", stem)):  # a reason may name the case, not the file
            self.names.setdefault(name, tok)
        self.tokens[path] = self._folder(path) + tok
        return self.tokens[path]

    def scrub(self, text: str) -> str:
        raw = re.escape(str(self.raw))
        text = re.sub(raw + r"[^\s;,'\"()\[\]]*", lambda m: self.token(m.group(0)), text)
        for name in sorted(self.names, key=len, reverse=True):
            if len(name) >= 3:
                text = text.replace(name, self.names[name])
        return text

    def write_map(self, store_path: str) -> None:
        lines = [("id", "source", "label"), *sorted(set(self.rows))]
        from io import StringIO

        buf = StringIO()
        csv.writer(buf).writerows(lines)
        _write_private(id_map_path(store_path), buf.getvalue())
