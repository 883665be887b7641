"""LoopServe's multi-turn long-context benchmark (a client of a server).

``published``: the data set's layout (``multi_turn`` rows with the question at
the front, middle or back of each turn), read from a local file and written by
our generator.  ``metrics``: LongBench's scores and the agreement of a
method's greedy answer with full attention's.
"""
