"""Retrieval measures (numpy only) and the reports built on them."""
