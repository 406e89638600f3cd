"""Thin adapters between sheetanchor and frameworks (Celery, FastAPI, ...).

Each adapter lives in its own module and is imported explicitly; the core never imports one.
"""
