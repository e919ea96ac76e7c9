import torch

device = torch.device("cpu")
cpu = torch.device("cpu")
dtype = torch.float16
