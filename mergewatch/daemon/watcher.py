"""File events from the inbox: a real watchdog observer (inotify, or polling for network
filesystems) that feeds ``Inbox.note``. Events can be lost (inotify queue overflow, NFS gives none),
so the daemon also scans at start and periodically (DESIGN §3.1); the observer only makes drops be
noticed sooner."""

from __future__ import annotations

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

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(timeout=5)

    @property
    def alive(self) -> bool:
        return self.observer.is_alive()
