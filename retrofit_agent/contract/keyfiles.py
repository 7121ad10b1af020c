"""Writing key files: never over an existing key unless asked, secrets 0600 from creation.

Each file is written to a temporary file in the same directory (``mkstemp`` creates it with
mode 0600, so a secret is never readable by others, not even for a moment), fsynced and
then moved into place in one step: a crash leaves either no key or a complete one. Without
``force`` the final step is a hard link, which fails if the name exists, so two key
generators racing for the same name cannot overwrite each other either.

A key's **fingerprint** is ``sha256:`` followed by the first 16 hex digits (64 bits) of the
sha256 of the raw 32-byte public key: short enough to read out over the phone, long enough
to tell keys apart.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from retrofit_agent.contract.errors import ConfigError

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644


def fingerprint(raw_public_key: bytes) -> str:
    """``sha256:<16 hex digits>`` of the raw public key bytes."""
    return "sha256:" + hashlib.sha256(raw_public_key).hexdigest()[:16]


def refuse_existing(paths: Iterable[Path], force: bool) -> None:
    """Raise ConfigError naming the first path that exists, unless ``force``."""
    if force:
        return
    for path in paths:
        if path.exists() or path.is_symlink():
            raise ConfigError(f"{path} already exists; refusing to overwrite a key (use --force to replace it)")


def prepare_directory(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create key directory {directory}: {e.strerror or e}") from None


def write_key_file(path: Path, data: bytes, mode: int, force: bool = False) -> None:
    """Write ``data`` to ``path`` atomically with ``mode``; refuse an existing ``path`` unless ``force``."""
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode != SECRET_MODE:
            tmp.chmod(mode)
        if force:
            os.replace(tmp, path)
        else:
            _place_new(tmp, path)
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"{path} already exists; refusing to overwrite a key (use --force to replace it)") from None
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from None
    _fsync_directory(path.parent)


def _place_new(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless ``path`` exists (FileExistsError)."""
    try:
        os.link(tmp, path)  # fails if the name exists: no silent overwrite, even in a race
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links (e.g. FAT): check, then rename
        if path.exists() or path.is_symlink():
            raise FileExistsError(path) from None
        os.replace(tmp, path)
    else:
        tmp.unlink()


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
