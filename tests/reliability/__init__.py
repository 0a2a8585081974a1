"""Reliability tests: the chaos soak (``python -m tests.reliability.soak --minutes 10`` by hand) and its short run."""
