"""Models: the DC ConvNet, MLP, LeNet, AlexNet, VGG11, ResNet18 and BatchNorm variants (``get_model``)."""
from .nets import (MLP, ZOO, AlexNet, ConvNet, LeNet, ResNet18, VGG11, build, check_logits, embedding_fn, get_model,
                   model_identity, model_name)

__all__ = ["AlexNet", "ConvNet", "LeNet", "MLP", "ResNet18", "VGG11", "ZOO", "build", "check_logits", "embedding_fn",
           "get_model", "model_identity", "model_name"]
