"""Prefect flows: orchestration only; the work is in src/bonefrac."""
