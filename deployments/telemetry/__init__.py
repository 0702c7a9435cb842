"""Prometheus metrics of both deployments: per request (the front ends'), per replica (engine and
adapters), under one label rule for adapter names (adapter_metrics.py)."""
