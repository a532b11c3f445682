"""jobs.label: one Parquet row per input image, exactly once, errors included.

- ``checks``: flags, model and input, before Ray starts, and what makes two runs one job;
- ``inputs``: listing the images or shard rows, and what an earlier run left to do;
- ``predictor``: the model actor that turns pixels into label rows;
- ``sink``: the label row schema and the sink that commits each file whole;
- ``output``: reading committed rows back, and progress while they arrive;
- ``job``: the pipeline, from listing to the summary.
"""
