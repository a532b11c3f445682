"""The Ray Data stage that jobs.label and jobs.evaluate share, and one-image prediction.

- ``pixels``: the CPU tasks that read and decode images into the model's crops (or, for a GPU
  predictor, pass plain JPEGs on as bytes);
- ``parquet_rows``: Parquet image shards as rows with a ``uri``, in blocks of a decode batch;
- ``actor``: the model actor, which loads the artifact once, masks the rows that failed to
  decode and predicts the rest; jobs subclass it to shape their rows;
- ``stage``: decode tasks, then an actor pool, sized for the cluster;
- ``in_process``: a few images in the caller's process, with the same decode and model.
"""
