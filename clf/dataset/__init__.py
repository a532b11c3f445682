"""The dataset format that ``jobs.ingest`` writes and training and evaluation read: Parquet image
shards under ``DST/{train,val,test}/`` (original bytes, never re-encoded), ``classes.json`` and
``manifest.json``.

- ``shards``: the schema, the class list, and listing, counting and reading shards;
- ``ingest``: an ImageFolder tree into shards.
"""
