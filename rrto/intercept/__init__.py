"""The virtual cuda device: RemoteTensor, the calls that name the device, torch.cuda answers, and launch."""
