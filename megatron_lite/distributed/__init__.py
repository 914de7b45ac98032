"""Gradient synchronisation across ranks and global gradient clipping."""
