"""The virtual cuda device: RemoteTensor, the torch modes, torch.cuda answers, and launch."""
