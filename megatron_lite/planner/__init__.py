"""The parallelism planner: what a layout costs, by formula (parameters.py, memory.py, traffic.py,
schedule.py), how long its step takes on a cluster (hardware.py, step_time.py), and the search
over layouts (search.py) that tools/plan_parallelism.py prints."""
