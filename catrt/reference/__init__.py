"""A small trained text-to-image reference model (procedural shapes) for measuring pruning quality.

No SD3 weights can be downloaded here, and random weights do not denoise like a trained
model, so this package ships a tiny SD3-layout transformer trained on `data` captions,
its own text encoder, and a probe classifier that scores generated images.
"""
