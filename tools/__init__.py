"""Command-line tools, run as scripts (`python tools/preprocess_data.py ...`); a package so tests import them."""
