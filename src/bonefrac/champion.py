"""Manual control of the `champion` alias: pin, roll back, unpin (`bonefrac champion ...`).

A person's move pins the champion: the automatic gate keeps a pinned champion (and still
records its comparison) until `unpin`. Who, when, why and what are tags on the version.
"""

from __future__ import annotations

import getpass
import time

from bonefrac.config import Settings
from bonefrac.errors import UserError
from bonefrac.registry import (
    CHAMPION,
    PIN_TAG,
    current_champion,
    guarded,
    registered_name,
    registry_client,
    registry_failure,
)


def _resolve(settings: Settings, model: str) -> str:
    from bonefrac.train import model_names

    names = {n: registered_name(n, settings) for n in model_names(settings)}
    if model in names:
        return names[model]
    if model in names.values():
        return model
    raise UserError(f"unknown model {model!r}: choose from {', '.join(names)}")


def set_champion(
    settings: Settings, model: str, version: str, reason: str, action: str = "pin"
) -> str:
    """Move `champion` to VERSION by hand and pin it there (the gate keeps a pinned champion
    until `unpin`), recording who, when, why and what on the version. `rollback` must go to
    a version older than the current champion. Returns a one-line summary."""
    if not reason.strip():
        raise UserError("--reason is empty: say why the champion is moved by hand")
    client = registry_client(settings)
    name = _resolve(settings, model)
    found = current_champion(client, name)
    try:
        target = client.get_model_version(name, str(version))
    except Exception as exc:
        from mlflow.exceptions import MlflowException

        if isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise UserError(f"{name} has no version {version}: see the MLflow UI") from None
        raise registry_failure(client.tracking_uri, f"reading {name} v{version}", exc) from exc
    if action == "rollback" and found and int(target.version) >= int(found[0].version):
        raise UserError(
            f"rollback goes to an older version than champion v{found[0].version}: use pin"
        )
    record = {
        "bonefrac.pin.by": getpass.getuser(),
        "bonefrac.pin.at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bonefrac.pin.reason": reason.strip(),
        "bonefrac.pin.action": action,
        "bonefrac.pin.previous": str(found[0].version) if found else "none",
    }
    for key, value in record.items():
        guarded(client, "tagging", client.set_model_version_tag, name, target.version, key, value)
    guarded(client, "pinning", client.set_registered_model_tag, name, PIN_TAG, target.version)
    guarded(
        client,
        "moving the alias",
        client.set_registered_model_alias,
        name,
        CHAMPION,
        target.version,
    )
    previous = f" (was v{found[0].version})" if found else ""
    return f"{name}@{CHAMPION} -> v{target.version}{previous}, pinned: {reason.strip()}"


def unpin(settings: Settings, model: str, reason: str) -> str:
    """Let the gate decide again for MODEL; the champion stays where it is."""
    if not reason.strip():
        raise UserError("--reason is empty: say why the pin is released")
    client = registry_client(settings)
    name = _resolve(settings, model)
    found = current_champion(client, name)
    if not found or not found[1]:
        raise UserError(f"{name} has no pinned champion")
    version = found[0].version
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    note = f"{getpass.getuser()} at {stamp}: {reason.strip()}"
    tag = client.set_model_version_tag
    guarded(client, "tagging", tag, name, version, "bonefrac.unpinned", note)
    guarded(client, "unpinning", client.delete_registered_model_tag, name, PIN_TAG)
    return f"{name}: champion v{version} unpinned; the next gate decides"
