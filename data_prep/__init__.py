"""Dataset preparation: ImageNet folders to WebDataset shards and FFCV files (see the data issue).

images (keep / convert / skip decisions, resizing), wds (``python -m data_prep.wds``), ffcv
(``python -m data_prep.ffcv``), verify (``python -m data_prep.verify``), manifest (atomic writes,
hashing). The listing and global indices come from ``mimscale.data.imagenet``, the same listing
the trainer's folder source reads, so an index names the same file in every format.
"""
