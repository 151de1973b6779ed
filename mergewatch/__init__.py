"""mergewatch: a daemon for continual model merging."""

__version__ = "0.1.0"
