"""Exception types shared by every layer (imports nothing else of the package)."""


class MergewatchError(Exception):
    """Base class of every error mergewatch raises on purpose."""


class ConfigError(MergewatchError):
    """A configuration value is missing, unknown, of the wrong type or out of range.

    ``key`` is the dotted path of the offending option (e.g. ``policy.ties.p``).
    """

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config error at '{key}': {message}")


class CheckpointError(MergewatchError):
    """A checkpoint file or directory is unreadable, malformed or unsafe."""

    def __init__(self, path, message: str):
        self.path = str(path)
        self.reason = message
        super().__init__(f"{path}: {message}")


class IncompatibleExpertError(MergewatchError):
    """An expert does not match the base (keys, shapes, dtypes, values)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(f"expert is incompatible with the base ({len(self.problems)} problem(s)):\n  {shown}{more}")
