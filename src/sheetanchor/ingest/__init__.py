"""Ingest: bounded write buffers into PostgreSQL, with an optional disk journal."""
