"""The agent's HTTP surface: Prometheus metrics (own registry) and health/readiness probes."""
