"""The long-running service: watcher, worker loop, ledger, scheduler jobs, metrics, logging, sd_notify."""
