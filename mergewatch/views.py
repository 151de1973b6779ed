"""The two published views (DESIGN §3.2): ``deploy`` (the model to serve) and ``init`` (the model the
next expert should be fine-tuned from). Strategies write them, the publisher and the loader lay
them out, the CLI and the metrics name them: this is their one definition."""

VIEWS = ("deploy", "init")
