"""Training objectives other than MAE's pixel reconstruction.

A method is a masker (which patches go where: ``mimscale.masking``) plus, optionally, an
objective (what is computed from the plan); the registry (mimscale/methods/) pairs them.
MAE, AMT and AutoMAE use MIMModel's own reconstruction path; R-MAE and C-MAE read the plan as
two complementary views:
    rmae.py    shared decoder, distance between the views' decodings + auto-encoding
    cmae.py    token-wise InfoNCE between online and EMA-target encodings
and SimMIM (and AMT on it) puts mask tokens in the encoder instead of a decoder:
    simmim.py  linear head on every encoder token, L1 on masked pixels
An objective is a submodule of MIMModel, so its parameters are partitioned and trained by the
same engine and optimizer step, under every ZeRO stage.
"""
