"""Content fingerprints of what decides a row: the data files, the images each sample reads, the model folder.

A file's fingerprint is the SHA-256 of its content. Hashes are cached in ``content_hashes.json`` under
``$ATTNKIT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/attnkit`` or ``~/.cache/attnkit``), keyed by
``(absolute path, size, mtime_ns, inode)``: an edited file has a new mtime and a copied one a new path and
inode, so both are hashed again; an unchanged file is only ``stat``-ed. An unwritable cache folder just
means hashing every run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

CACHE_NAME = "content_hashes.json"
_MAX_ENTRIES = 500_000


def cache_dir() -> Path:
    env = os.environ.get("ATTNKIT_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attnkit"


def digest(obj: Any) -> str:
    """SHA-256 of ``obj`` as sorted-key JSON (paths and other objects as ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class HashCache:
    """``file_hash(path)``: the content hash, from the cache when ``(path, size, mtime_ns, inode)`` matches."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else cache_dir() / CACHE_NAME
        self._entries: dict[str, str] = {}
        self._dirty = False
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict):
                self._entries = {str(k): str(v) for k, v in data.items()}
        except (OSError, ValueError):
            pass

    @staticmethod
    def _key(path: Path) -> tuple[str, os.stat_result] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}", st

    def file_hash(self, path: str | Path) -> str | None:
        """Content SHA-256 of a regular file; None if it does not exist or cannot be read."""
        path = Path(path)
        found = self._key(path)
        if found is None or not path.is_file():
            return None
        key, _ = found
        if key in self._entries:
            return self._entries[key]
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
        except OSError:
            return None
        self._entries[key] = h.hexdigest()
        self._dirty = True
        return self._entries[key]

    def save(self) -> None:
        """Write the cache atomically (best effort: an unwritable cache folder is not an error)."""
        if not self._dirty:
            return
        entries = self._entries
        if len(entries) > _MAX_ENTRIES:
            entries = dict(list(entries.items())[-_MAX_ENTRIES:])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(entries))
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError:
            pass


def folder_fingerprint(folder: str | Path, cache: HashCache) -> str | None:
    """Hash of every regular file in ``folder`` (recursively, hidden entries skipped): names and contents.

    For a model folder this covers the weights, ``config.json``, the tokenizer and the chat template.
    None if ``folder`` is not a directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    items = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root) / name
            items.append((str(path.relative_to(folder)), cache.file_hash(path)))
    return digest(items)


def samples_fingerprint(samples: Iterable[Any], cache: HashCache) -> str:
    """Hash of every sample's id, split, question, answer, meta and the content of the image it reads."""
    items = []
    for s in samples:
        image = getattr(s, "image", None)
        items.append({"id": s.id, "split": getattr(s, "split", None), "question": s.question,
                      "answer": getattr(s, "answer", None), "meta": getattr(s, "meta", None),
                      "image": None if image is None else [Path(image).name, cache.file_hash(image)]})
    return digest(items)


def options_fingerprint(options: Mapping[str, Any] | None) -> str:
    return digest(dict(options or {}))


def intervention_files_fingerprint(specs: Iterable[str], cache: HashCache) -> str | None:
    """Hash of the content of every file or folder an intervention spec names in a parameter listed in its
    class's ``files`` (e.g. ``vhr:scores=heads.json``), so rows computed with other calibration contents are
    never served; None when the specs name no file."""
    from attnkit.interventions import build

    items = []
    for spec in specs:
        iv = build(spec)
        for name in type(iv).files:
            value = getattr(iv, name)
            if value is None:
                continue
            path = Path(value)
            content = folder_fingerprint(path, cache) if path.is_dir() else cache.file_hash(path)
            items.append([iv.name, name, content])
    return digest(items) if items else None

