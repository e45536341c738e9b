"""Prefect tasks wrapping the data/ and model/ libraries: retries, cache policies, artifacts."""
