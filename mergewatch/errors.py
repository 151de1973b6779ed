"""Exception types shared by every layer (imports nothing else of the package)."""


class MergewatchError(Exception):
    """Base class of every error mergewatch raises on purpose."""


class ConfigError(MergewatchError):
    """A configuration value is missing, unknown, of the wrong type or out of range.

    ``key`` is the dotted path of the offending option (e.g. ``policy.ties.p``).
    """

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"config error at '{key}': {message}")


#: Why a drop was rejected: the bounded ``reason`` label of ``mergewatch_experts_total{outcome="rejected"}``
#: and the ``reason_class`` of a ledger row (the full reason is kept beside it).
REJECT_CLASSES = (
    "truncated",        # shorter (or longer) than its header says
    "header",           # a corrupt or implausible safetensors header
    "layout",           # a sharded directory whose index and shards disagree
    "not_safetensors",  # some other kind of file
    "pickle",           # a pickle-based checkpoint (never loaded)
    "unreadable",       # an I/O error
    "symlink",          # drops must be the file itself
    "missing_key",      # a tensor of the base is absent
    "unexpected_key",   # a tensor the base does not have
    "shape",            # a tensor's shape differs from the base's
    "dtype",            # a dtype the dtype policy does not allow
    "nonfinite",        # NaN or Inf values
    "sidecar",          # the sidecar JSON is invalid or has unknown or ill-typed fields
    "vanished",         # the drop disappeared before it was claimed
    "step_failed",      # the strategy step refused the expert
    "internal",         # a bug: an unexpected exception while merging
)


class CheckpointError(MergewatchError):
    """A checkpoint file or directory is unreadable, malformed or unsafe. ``kind`` is one of
    ``REJECT_CLASSES``."""

    def __init__(self, path, message: str, kind: str = "header"):
        assert kind in REJECT_CLASSES, kind
        self.path = str(path)
        self.reason = message
        self.kind = kind
        super().__init__(f"{path}: {message}")


class Problem(str):
    """One line of an incompatibility report, with its class (one of ``REJECT_CLASSES``)."""

    kind: str

    def __new__(cls, kind: str, text: str) -> "Problem":
        assert kind in REJECT_CLASSES, kind
        p = super().__new__(cls, text)
        p.kind = kind
        return p


class IncompatibleExpertError(MergewatchError):
    """An expert does not match the base (keys, shapes, dtypes, values). ``problems`` lists every
    one; the message shows the first 50 (``full_text`` all of them)."""

    SHOWN = 50

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[: self.SHOWN])
        more = f"\n  ... and {len(self.problems) - self.SHOWN} more" if len(self.problems) > self.SHOWN else ""
        super().__init__(f"{self.headline}:\n  {shown}{more}")

    @property
    def headline(self) -> str:
        return f"expert is incompatible with the base ({len(self.problems)} problem(s))"

    @property
    def kind(self) -> str:
        """The class of the first problem (problems of other kinds are in ``problems``)."""
        return getattr(self.problems[0], "kind", "shape") if self.problems else "shape"

    @property
    def full_text(self) -> str:
        return self.headline + ":\n  " + "\n  ".join(self.problems)


class SidecarError(MergewatchError):
    """A drop's sidecar JSON is invalid or has unknown or ill-typed fields."""

    kind = "sidecar"


def rejection(exc: BaseException) -> tuple[str, str, list[str]]:
    """(class, full reason, problems) of an error that rejects a drop: what the ledger, the log,
    ``status --json``, ``<name>.reason.txt`` and the metric's ``reason`` label say."""
    if isinstance(exc, IncompatibleExpertError):
        return exc.kind, exc.full_text, [str(p) for p in exc.problems]
    if isinstance(exc, CheckpointError):
        return exc.kind, str(exc), [exc.reason]
    if isinstance(exc, SidecarError):
        return "sidecar", str(exc), [str(exc)]
    if isinstance(exc, FileNotFoundError):
        return "vanished", str(exc), [str(exc)]
    if isinstance(exc, OSError):
        return "unreadable", str(exc), [str(exc)]
    return "internal", f"{type(exc).__name__}: {exc}", [f"{type(exc).__name__}: {exc}"]
