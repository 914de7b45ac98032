"""Context parallelism: the sequence split over the cp axis, and attention that exchanges keys and values.

zigzag.py cuts each sample into 2*cp chunks and gives rank r chunks r and 2*cp-1-r with their
true positions; attention.py computes causal attention of the local queries over the whole
sequence in one of three ways (--cp-comm-type): p2p (ring), allgather, a2a (Ulysses).
"""
