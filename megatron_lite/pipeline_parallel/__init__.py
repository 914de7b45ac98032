"""Pipeline parallelism: layer partitioning, neighbour p2p, schedules and their traces."""
