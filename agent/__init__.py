"""The agent side: what every host runs (runtime drivers, reconciler, service proxy)."""
