"""Models: the DC ConvNet, MLP and LeNet (``get_model``)."""
from .nets import MLP, ConvNet, LeNet, get_model

__all__ = ["ConvNet", "MLP", "LeNet", "get_model"]
