"""Evaluation of pretrained encoders (``python -m mimscale.eval probe|knn|cka``, see __main__.py).

features.py  which encoder, which data; whole-image feature extraction, cache, multi-rank gather
probe.py     linear probe (BatchNorm1d without affine + Linear) on frozen features
knn.py       weighted kNN (k = 20, T = 0.07), chunked
cka.py       linear CKA of full vs occluded images per block; the trainer's ``health_check``

Import what you use from its module (``from mimscale.eval.probe import linear_probe``): this
package imports none of them, so they can import each other without a cycle.
"""
