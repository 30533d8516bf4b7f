"""pymerge across processes and machines, on torch.distributed."""
