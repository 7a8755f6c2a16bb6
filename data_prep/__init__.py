"""Dataset preparation: ImageNet folders to WebDataset shards and FFCV files (see the data issue)."""
