"""Zero-shot classifiers from CLIP: the image tower of an open_clip model plus one linear layer
made of its text embeddings of the class names, so that an exported artifact is an ordinary
classifier that every job runs without open_clip."""
