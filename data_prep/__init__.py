"""Dataset preparation: ImageNet folders to WebDataset shards and FFCV files (see the data issue).

imagenet (listing and global indices), images (keep / convert / skip decisions, resizing),
wds (``python -m data_prep.wds``), ffcv (``python -m data_prep.ffcv``), verify
(``python -m data_prep.verify``), manifest (atomic writes, hashing).
"""
