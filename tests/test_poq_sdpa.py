import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from wkvq_core.config import CalibConfig, KVQuantConfig, WeightQuantConfig, WKVQuantConfig
from wkvq_core.errors import ConfigError
from wkvq_core.model import attentions, calibration_parameters, decoder_layers, prepare_model_
from wkvq_core.quant import kv_quant
from wkvq_core.quant.kv_quant import poq_attention, poq_attention_fused, set_attention_backend

from test_kv_quant import randomize_smoothing_


def attention_inputs(n_rep, head_dim, t_new, past, dtype=torch.float32, batch=2, n_kv_heads=2):
    """(query, key_stored, value_stored, key_new, value_new) for `t_new` tokens after `past` stored ones."""
    shapes = [(batch, n_kv_heads * n_rep, t_new, head_dim)] + [(batch, n_kv_heads, past + t_new, head_dim)] * 2
    shapes += [(batch, n_kv_heads, t_new, head_dim)] * 2
    return [torch.randn(shape, dtype=dtype).requires_grad_() for shape in shapes]


def output_and_gradients(attend, inputs, grad_out, n_rep, poq):
    out = attend(*inputs, None, inputs[0].shape[-1] ** -0.5, n_rep, poq)
    grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True, materialize_grads=True)
    return out, grads


class TestFusedAttention:
    @pytest.mark.parametrize(
        "n_rep, head_dim, t_new, past, poq", list(itertools.product((1, 3), (64, 8), (1, 6), (0, 5), (True, False)))
    )
    def test_matches_eager_in_output_and_gradients(self, n_rep, head_dim, t_new, past, poq):
        inputs = attention_inputs(n_rep, head_dim, t_new, past)
        grad_out = torch.randn(2, t_new, 2 * n_rep, head_dim)
        out, grads = output_and_gradients(poq_attention_fused, inputs, grad_out, n_rep, poq)
        ref_out, ref_grads = output_and_gradients(poq_attention, inputs, grad_out, n_rep, poq)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
        for name, grad, ref in zip(("query", "key_stored", "value_stored", "key_new", "value_new"), grads, ref_grads):
            torch.testing.assert_close(grad, ref, rtol=0, atol=1e-5, msg=f"gradient w.r.t. {name}")

    def test_bf16_is_within_bf16_tolerance(self):
        inputs = attention_inputs(3, 64, 16, 4, torch.bfloat16)
        grad_out = torch.randn(2, 16, 6, 64, dtype=torch.bfloat16)
        out, grads = output_and_gradients(poq_attention_fused, inputs, grad_out, 3, True)
        ref_inputs = [x.detach().float().requires_grad_() for x in inputs]
        ref_out, ref_grads = output_and_gradients(poq_attention, ref_inputs, grad_out.float(), 3, True)
        assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
        torch.testing.assert_close(out.float(), ref_out, rtol=2e-2, atol=2e-2)
        for grad, ref in zip(grads, ref_grads):
            torch.testing.assert_close(grad.float(), ref, rtol=5e-2, atol=5e-2)

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (memory-efficient kernel)")
    @pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-3), (torch.bfloat16, 5e-2)])
    def test_cuda_matches_eager(self, dtype, tol):
        """fp32 tolerance allows for TF32 inside the kernel."""
        for n_rep, head_dim, t_new, past in ((1, 64, 40, 0), (3, 8, 1, 7), (3, 64, 33, 5)):
            inputs = [x.detach().cuda().requires_grad_() for x in attention_inputs(n_rep, head_dim, t_new, past, dtype)]
            grad_out = torch.randn(2, t_new, 2 * n_rep, head_dim, dtype=dtype, device="cuda")
            out, grads = output_and_gradients(poq_attention_fused, inputs, grad_out, n_rep, True)
            ref_inputs = [x.detach().float().requires_grad_() for x in inputs]
            ref_out, ref_grads = output_and_gradients(poq_attention, ref_inputs, grad_out.float(), n_rep, True)
            for value, ref in zip((out, *grads), (ref_out, *ref_grads)):
                torch.testing.assert_close(value.float(), ref, rtol=tol, atol=tol)

    def test_casts_to_the_autocast_dtype(self):
        """Under autocast the smoothed query is fp32 while v_proj's output is bf16, as in CUDA calibration."""
        query, key_stored, value_stored, key_new, value_new = attention_inputs(3, 8, 6, 0)
        inputs = (query, key_stored, value_stored.bfloat16(), key_new, value_new.bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = poq_attention_fused(*inputs, None, 0.3, 3, True)
            ref = poq_attention(*inputs, None, 0.3, 3, True)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)

    def test_refuses_a_mask(self):
        inputs = attention_inputs(1, 8, 4, 0)
        with pytest.raises(ValueError, match="attention_mask None"):
            poq_attention_fused(*inputs, torch.zeros(2, 1, 4, 4), 0.3, 1, True)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.numel = max(self.numel, x.numel())
        return out


@pytest.mark.parametrize("past", [0, 8])
def test_no_score_tensor_in_forward_or_backward(past):
    """head_dim 8 and 64 tokens: any (B, H, T, S) score tensor is 8x larger than the query."""
    t_new, n_rep = 64, 2
    inputs = attention_inputs(n_rep, 8, t_new, past)
    grad_out = torch.randn(2, t_new, 2 * n_rep, 8)
    score_numel = 2 * 2 * n_rep * t_new * (past + t_new)
    for attend, has_scores in ((poq_attention_fused, False), (poq_attention, True)):
        with _LargestTensor() as largest:
            output_and_gradients(attend, inputs, grad_out, n_rep, True)
        assert (largest.numel >= score_numel) == has_scores, attend.__name__


def tiny_llama(options: dict) -> LlamaForCausalLM:
    """A float64 prepared GQA LLaMA (8 heads, 2 KV heads, head_dim 8) with random smoothing and LWC: float64 keeps
    the two attention paths off different sides of a 4-bit rounding boundary."""
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=128,
    )).double().eval()
    prepare_model_(model, WKVQuantConfig(
        weight=WeightQuantConfig(bits=4, group_size=-1, lwc=True),
        kv=KVQuantConfig(bits=4, **options),
        calib=CalibConfig(nsamples=4, seqlen=32, epochs=0),
    ))
    randomize_smoothing_(model)
    return model


def logits_and_gradients(model, ids):
    """Logits through the decoder layers called as calibration calls them (no mask), and the loss gradients
    w.r.t. the calibration parameters and the input embeddings."""
    params = [p for layer in decoder_layers(model) for group in calibration_parameters(layer) for p in group]
    for p in params:
        p.requires_grad_(True)
    x = model.get_input_embeddings()(ids).detach().requires_grad_()
    position_embeddings = model.model.rotary_emb(x, torch.arange(ids.shape[1])[None])
    h = x
    for layer in decoder_layers(model):
        h = layer(h, attention_mask=None, position_embeddings=position_embeddings)
    logits = model.lm_head(model.model.norm(h))
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return logits, torch.autograd.grad(loss, [x, *params])


@pytest.mark.parametrize("options", [{}, dict(k_pre_rope=True, rotate=True, sink_tokens=4), dict(poq=False)],
                         ids=["paper", "k_pre_rope-rotate-sinks", "no-poq"])
def test_model_logits_and_gradients_match_eager(options, monkeypatch):
    model = tiny_llama(options)
    ids = torch.randint(0, 128, (2, 24))
    softmax = torch.softmax
    with monkeypatch.context() as patch:  # eager's softmax in float64 too, not fp32, for a float64 reference
        patch.setattr(torch, "softmax", lambda x, dim, dtype=None: softmax(x, dim))
        ref_logits, ref_grads = logits_and_gradients(model, ids)
    set_attention_backend(model, "sdpa")

    def eager_not_allowed(*args):
        raise AssertionError("the sdpa backend fell back to the eager attention")

    monkeypatch.setattr(kv_quant, "poq_attention", eager_not_allowed)
    logits, grads = logits_and_gradients(model, ids)
    for value, ref in zip((logits, *grads), (ref_logits, *ref_grads)):
        torch.testing.assert_close(value, ref, rtol=0, atol=1e-10 * ref.abs().max().item())


def test_masked_forward_stays_on_the_eager_path():
    """The whole-model forward passes an additive mask, so "sdpa" leaves it bit-identical."""
    model = tiny_llama({})
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
        set_attention_backend(model, "sdpa")
        assert torch.equal(model(ids, use_cache=False).logits, reference)


def test_set_attention_backend_sets_every_attention_and_refuses_unknown_names():
    model = tiny_llama({})
    assert {attn.attention_backend for attn in attentions(model)} == {"eager"}
    set_attention_backend(model, "sdpa")
    assert {attn.attention_backend for attn in attentions(model)} == {"sdpa"}
    with pytest.raises(ConfigError, match="attention backend"):
        set_attention_backend(model, "flash")
