"""File events from the inbox: a real watchdog observer (inotify, or polling for network
filesystems) that feeds ``Inbox.note``. Events can be lost (inotify queue overflow, NFS gives none),
so the daemon also scans at start and periodically (DESIGN §3.1); the observer only makes drops be
noticed sooner."""

from __future__ import annotations

import contextlib
import os
import time

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from mergewatch.daemon.inbox import Inbox


class _Handler(FileSystemEventHandler):
    def __init__(self, inbox: Inbox):
        self.inbox = inbox

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type == "moved":
            self.inbox.note(event.dest_path, moved_in=True)
        elif event.event_type in ("created", "modified", "closed"):
            self.inbox.note(event.src_path)


class InboxWatcher:
    def __init__(self, inbox: Inbox, *, polling: bool = False, poll_interval: float = 1.0):
        self.inbox = inbox
        self.polling = polling
        self.observer = PollingObserver(timeout=poll_interval) if polling else Observer()
        self.observer.schedule(_Handler(inbox), str(inbox.root), recursive=True)

    def start(self) -> None:
        self.observer.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the emitter threads first, then the observer, so that a clean stop logs no error.

        ``observer.stop()`` tears each emitter's inotify watch group down while the emitter thread
        may still hold an event it has read, and watchdog then logs "InotifyEmitter.queue_events()
        called when the thread is inactive". After a merge that is the rule, not a race: claiming a
        drop moves it out of the inbox, an IN_MOVED_FROM without a matching IN_MOVED_TO, which
        watchdog holds 0.5 s to pair it, so a SIGTERM within 0.5 s of a claim finds the emitter
        waiting to deliver it. So: ask each emitter to stop, wake it (listing its directory is an
        inotify event), let it deliver what it holds and leave its loop, and only then stop and join
        the observer, which removes the watches and closes inotify with no emitter running.
        """
        deadline = time.monotonic() + timeout
        emitters = [e for e in self.observer.emitters if e.is_alive()]
        for e in emitters:
            e.stopped_event.set()
            with contextlib.suppress(OSError):
                os.listdir(e.watch.path)
        for e in emitters:
            e.join(max(0.0, deadline - time.monotonic()))
        self.observer.stop()
        self.observer.join(max(0.0, deadline - time.monotonic()))

    @property
    def alive(self) -> bool:
        return self.observer.is_alive()
