"""Evaluation of pretrained encoders (``python -m mimscale.eval probe|knn|cka``, see __main__.py).

features.py  which encoder, which data; whole-image feature extraction, cache, multi-rank gather
probe.py     linear probe (BatchNorm1d without affine + Linear) on frozen features
knn.py       weighted kNN (k = 20, T = 0.07), chunked
cka.py       linear CKA of full vs occluded images per block; the trainer's ``health_check``
"""
from mimscale.eval.cka import cka_by_block, health_check, linear_cka, summarize
from mimscale.eval.features import extract_features, open_checkpoint, split_features
from mimscale.eval.knn import knn_classify
from mimscale.eval.probe import linear_probe

__all__ = ["cka_by_block", "extract_features", "health_check", "knn_classify", "linear_cka", "linear_probe",
           "open_checkpoint", "split_features", "summarize"]
