"""A bundle's integrity: a SHA-256 manifest written when it is packaged, checked when it is
imported (`bonefrac serve --bundle DIR`).

A bundle is code: its Keras files and pickled PCA run when loaded, so it must come from a
trusted pipeline. These checks make sure it is the bundle that pipeline wrote: every file
listed with its SHA-256, nothing added or changed, no symbolic links, no path leaving the
folder, and part names that are the plain names of the configured body parts.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path

from bonefrac.errors import DataError

MANIFEST = "SHA256SUMS.json"
_PLAIN_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    """Every file under `folder`, refusing symbolic links (to files or folders)."""
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise DataError(
                f"{folder} contains a symbolic link ({path.relative_to(folder)}); a bundle "
                "must hold its files itself: package the models again"
            )
        if path.is_file() and path.name != MANIFEST:
            found.append(path)
    return found


def write_manifest(folder: Path) -> Path:
    """Write SHA256SUMS.json: {relative path: sha256} of every file of the bundle."""
    folder = Path(folder)
    sums = {p.relative_to(folder).as_posix(): _sha256(p) for p in _files(folder)}
    out = folder / MANIFEST
    out.write_text(json.dumps({"sha256": sums}, indent=2, sort_keys=True) + "\n")
    return out


def verify_bundle(folder: Path, manifest: dict, parts: Iterable[str] | None = None) -> None:
    """Raise DataError unless the bundle is exactly what packaging wrote.

    `manifest` is bundle.json; `parts` are the short names of the configured body parts
    (data.parts); when given, the bundle's parts must be among them.
    """
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        raise DataError(f"{folder} is not a bundle folder: pass the folder packaging wrote")
    names = [*manifest.get("parts", []), *manifest.get("models", {})]
    bad = [str(n)[:40] for n in names if not isinstance(n, str) or not _PLAIN_NAME.fullmatch(n)]
    if bad:
        raise DataError(f"{folder}/bundle.json has part names that are not plain names: {bad}")
    allowed = set(parts) if parts is not None else None
    if allowed is not None and not set(manifest.get("parts", [])) <= allowed:
        extra = sorted(set(manifest.get("parts", [])) - allowed)
        raise DataError(
            f"{folder} has models for {extra}, which are not in data.parts {sorted(allowed)}: "
            "package the models for this configuration"
        )
    sums_path = folder / MANIFEST
    if not sums_path.is_file() or sums_path.is_symlink():
        raise DataError(f"{folder} has no {MANIFEST}: package the models again")
    try:
        listed = json.loads(sums_path.read_text())["sha256"]
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{sums_path} is not readable: package the models again") from None
    root = folder.resolve()
    for name in listed:
        if not (folder / name).resolve().is_relative_to(root):
            raise DataError(f"{sums_path} lists a path outside the bundle: {str(name)[:60]!r}")
    present = {p.relative_to(folder).as_posix(): p for p in _files(folder)}
    if set(present) != set(listed):
        changed = sorted(set(present) ^ set(listed))[:5]
        raise DataError(
            f"{folder} does not hold the files its {MANIFEST} lists (added or missing: "
            f"{changed}): package the models again"
        )
    for name, path in present.items():
        if _sha256(path) != listed[name]:
            raise DataError(
                f"{folder}/{name} does not match its SHA-256 in {MANIFEST} (changed after "
                "packaging): package the models again"
            )
