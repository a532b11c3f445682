"""jobs.monitor: after a night's labelling, whether its rows drifted from the reference, and
which images a person should look at.

- ``checks``: flags, the run to monitor and its reference, before any row is read;
- ``rows``: the columns monitoring needs, as numpy arrays;
- ``drift``: the tests and distances (scipy) and the verdict;
- ``review``: the review queue and its contact sheet;
- ``job``: drift.json, drift.png and the queue.
"""
