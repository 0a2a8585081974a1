"""``persistence-sidecar demo``: a simulated orchestrator with the sidecar embedded, and its condensed outage log."""
