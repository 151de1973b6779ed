"""The expert buffer: a content-addressed store that keeps what the policy needs."""

from mergewatch.buffer.store import ExpertStore

__all__ = ["ExpertStore"]
