"""Models whose widths and depth are config fields, each enumerating its growth sites."""

from growjax.nets.checkpoints import (BERT_HEADS, HFCheckpoint, hidden_states,
                                     load_hf_checkpoint, read_safetensors, transformer_config)
from growjax.nets.common import ACTIVATIONS, config_dict, from_config_dict
from growjax.nets.convnet import ConvNet
from growjax.nets.mlp import MLP
from growjax.nets.resnet import ResNet
from growjax.nets.sites import IN, OUT, Leaf, Site
from growjax.nets.transformer import Transformer

__all__ = ["ACTIVATIONS", "BERT_HEADS", "ConvNet", "HFCheckpoint", "IN", "Leaf", "MLP", "OUT",
           "ResNet", "Site", "Transformer", "config_dict", "from_config_dict", "hidden_states",
           "load_hf_checkpoint", "read_safetensors", "transformer_config"]
