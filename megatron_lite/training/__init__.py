"""The application layer: flags to a Config (arguments.py), a Config to this rank's model and
optimizer (parallelize.py), the loop (loop.py) and its start-up report (report.py), logging
(metrics.py, metric_writers.py) and when to stop (exit_conditions.py)."""
