"""Versioned publishing of the deployed and init views, and the loader inference code uses (DESIGN §3.2).

The names below are imported on first use, so that the publisher (used by the CLI's light verbs)
does not import torch (issue 14).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergewatch.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "loader": ("IntegrityError", "LoadError", "LoadedModel", "ModelWatcher", "VersionGoneError", "load_current", "load_version", "state_dict"),
    "publisher": ("Publisher", "PublishError"),
})

if TYPE_CHECKING:
    from mergewatch.deploy.loader import (
        IntegrityError,
        LoadedModel,
        LoadError,
        ModelWatcher,
        VersionGoneError,
        load_current,
        load_version,
        state_dict,
    )
    from mergewatch.deploy.publisher import Publisher, PublishError
