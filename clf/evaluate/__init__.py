"""jobs.evaluate: a model artifact, or the HOG+SVM baseline, scored on a split of image shards.

- ``checks``: flags, shards and the class mapping, before Ray starts (no torch, no sklearn);
- ``scorer``: the model actor that passes every row on with its probabilities;
- ``job``: the pipeline and the summary;
- ``metrics``: the report's numbers (scikit-learn), ``report``: its files;
- ``diagnostics``: first-layer filters and the most confident mistakes;
- ``baseline``: HOG features and a linear SVM, fitted and scored without Ray.
"""
