"""HTTP routes: retrieval (/v1), admin (/admin, bearer token) and health/metrics."""
