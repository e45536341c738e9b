"""Prefect flows and the `imagenet` command line (flows only wire tasks; commands call libraries)."""
