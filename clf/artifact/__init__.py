"""The model artifact: a folder that labels, evaluates and predicts without our training code.

``meta.json`` describes the model (classes, preprocessing, provenance) and lists its files, one
per format (TorchScript, ONNX, int8 ONNX), each with its sha256. None of them needs the model's
Python class, and none runs pickled code when loaded.

- ``meta``: meta.json and the formats, read and checked without torch;
- ``classifier``: ``load_classifier`` and ``top_k``, what every job runs;
- ``onnx_cpu``: an ONNX file on onnxruntime and numpy alone, for CPU actors and jobs.predict;
- ``torch_model``: any format through PyTorch, on a CPU or a GPU;
- ``formats``: each format's export, parity check and loader;
- ``export``: writing an artifact, from a model or straight from pretrained weights;
- ``sample``: the real images every export is checked on.
"""
