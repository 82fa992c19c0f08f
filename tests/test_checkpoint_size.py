import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from wkvq_core.calib.calibrate import learned_parameters
from wkvq_core.config import WKVQuantConfig
from wkvq_core.model import prepare_model_


class _Shell(nn.Module):
    """Just enough of a causal LM for `prepare_model_`: model.layers and set_attn_implementation."""

    def __init__(self, layer):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([layer])

    def set_attn_implementation(self, name):
        pass


def test_block_checkpoint_of_a_7b_shaped_block_is_small():
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        shell = prepare_model_(_Shell(LlamaDecoderLayer(cfg, layer_idx=0)), WKVQuantConfig())
        learned = learned_parameters(shell.model.layers[0])
    nbytes = sum(p.numel() * p.element_size() for p in learned.values())
    groups = (4 * 4096 * 4096 + 3 * 4096 * 11008) // 128  # q, k, v, o + gate, up, down
    assert nbytes == groups * 2 * 4 + 4 * 32 * 128 * 4  # γ, β per group + four smoothing tensors, fp32
    assert round(nbytes / 2**20, 1) == 12.1  # the figure quoted in docs/operations.md
    fp16_weights = (4 * 4096 * 4096 + 3 * 4096 * 11008) * 2
    assert nbytes < fp16_weights / 30
