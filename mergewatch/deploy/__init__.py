"""Versioned publishing of the deployed and init views, and the loader inference code uses (DESIGN §3.2)."""

from mergewatch.deploy.loader import (
    IntegrityError,
    LoadError,
    LoadedModel,
    ModelWatcher,
    VersionGoneError,
    load_current,
    load_version,
    state_dict,
)
from mergewatch.deploy.publisher import Publisher, PublishError

__all__ = [
    "IntegrityError",
    "LoadError",
    "LoadedModel",
    "ModelWatcher",
    "PublishError",
    "Publisher",
    "VersionGoneError",
    "load_current",
    "load_version",
    "state_dict",
]
