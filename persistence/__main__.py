"""``python -m persistence``: the same command line as ``persistence-sidecar``."""

from persistence.cli import main

raise SystemExit(main())
