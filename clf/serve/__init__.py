"""jobs.serve: the artifact behind an HTTP endpoint on Ray Serve, batched, with the label
job's decoding, so that an image gets the same answer online as overnight."""
