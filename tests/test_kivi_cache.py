"""KIVICache: what it returns equals a direct simulation of KIVI's schedule, its residual is exact, and nbytes()
equals both the shape formula and a hand count."""

import pytest
import torch
from transformers import DynamicLayer, LlamaConfig
from transformers.cache_utils import Cache

from wkvq_core.calib.data import eval_windows
from wkvq_core.evaluation.baselines.kivi_cache import KIVICache, kivi_bytes
from wkvq_core.runtime.cache_keyword import with_cache


def fake_quant_group(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Groups along the last dim (one group for a 1-D x), quantized and dequantized as KIVI does (fp16 scale and
    minimum), in fp32."""
    x = x.float()
    mn = x.amin(-1, keepdim=True).half().float()
    scale = ((x.amax(-1, keepdim=True) - mn) / (2**bits - 1)).clamp(min=1e-6).half().float()
    return ((x - mn) / scale).round().clamp(0, 2**bits - 1) * scale + mn


def reference_view(keys: torch.Tensor, values: torch.Tensor, n_before: int, bits: int, group: int, residual: int):
    """What attention reads after an update that brought the cache from n_before tokens to keys.shape[-2] tokens:
    keys of the first floor(n_before / R) * R tokens quantized per channel over aligned groups of `group` tokens,
    values of the first max(n_before - R, 0) tokens quantized per token over groups of min(group, D) channels,
    everything else (including all new tokens) exact. Loops over single groups, no reshapes."""
    k_out, v_out = keys.clone().float(), values.clone().float()
    b, h, _, d = keys.shape
    q_keys, q_values, v_group = n_before // residual * residual, max(n_before - residual, 0), min(group, d)
    for i in range(b):
        for j in range(h):
            for start in range(0, q_keys, group):
                tokens = slice(start, start + group)
                for c in range(d):
                    k_out[i, j, tokens, c] = fake_quant_group(keys[i, j, tokens, c].float(), bits)
            for t in range(q_values):
                for c in range(0, d, v_group):
                    v_out[i, j, t, c : c + v_group] = fake_quant_group(values[i, j, t, c : c + v_group].float(), bits)
    return k_out, v_out


class RecordingLayer(DynamicLayer):
    """Keeps every key/value in full precision and returns the reference view of them."""

    def __init__(self, bits, group, residual):
        super().__init__()
        self.args = bits, group, residual

    def update(self, key_states, value_states, *args, **kwargs):
        n_before = self.get_seq_length()
        keys, values = super().update(key_states, value_states)
        return reference_view(keys, values, n_before, *self.args)


class ReferenceCache(Cache):
    def __init__(self, n_layers, bits, group, residual):
        super().__init__(layers=[RecordingLayer(bits, group, residual) for _ in range(n_layers)])


@pytest.mark.parametrize("bits,group,residual", [(4, 32, 128), (2, 4, 8), (3, 8, 16)])
def test_update_returns_the_reference_view(bits, group, residual):
    torch.manual_seed(0)
    b, h, d = 2, 3, 16
    cache = KIVICache(LlamaConfig(num_hidden_layers=1), bits, group, residual)
    ref = ReferenceCache(1, bits, group, residual)
    chunks = [5, 1, 1, 40, *([1] * 30), 130, 1, 1]  # a prefill, single tokens, then chunked appends
    for t in chunks:
        k, v = torch.randn(b, h, t, d) * 3, torch.randn(b, h, t, d)
        got_k, got_v = cache.update(k, v, 0)
        want_k, want_v = ref.update(k, v, 0)
        torch.testing.assert_close(got_k, want_k, rtol=0, atol=1e-6)
        torch.testing.assert_close(got_v, want_v, rtol=0, atol=1e-6)
        assert torch.equal(got_k[:, :, -t:], k) and torch.equal(got_v[:, :, -t:], v)  # new tokens exact
    assert cache.get_seq_length() == sum(chunks)


def test_decode_logits_equal_the_reference_simulation(tiny_model, eval_ids):
    """Token-by-token decoding of the shipped model through KIVICache (small G and R, so that both quantized stores
    fill up within the window) gives the logits of the same decoding through the reference view."""
    window = eval_windows(eval_ids, 96)[0]
    n_layers = tiny_model.config.num_hidden_layers
    kivi, ref = KIVICache(tiny_model.config, 4, 8, 16), ReferenceCache(n_layers, 4, 8, 16)
    with torch.no_grad():
        for t in range(window.numel()):
            ids = window[None, t : t + 1]
            got = tiny_model(ids, **with_cache(kivi), use_cache=True).logits
            want = tiny_model(ids, **with_cache(ref), use_cache=True).logits
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert kivi.get_seq_length() == window.numel()
    fp = tiny_model(window[None], use_cache=False).logits[0, -1]
    assert (got[0, -1] - fp).abs().max() > 1e-3  # the quantized past is read


def test_residual_tokens_are_exact_and_counted(tiny_model):
    """With KIVI's defaults (G 32, R 128) after 200 tokens: 128 keys quantized, 72 exact; 72 values quantized,
    the last 128 exact."""
    torch.manual_seed(0)
    cache = KIVICache(tiny_model.config)
    k, v = torch.randn(1, 4, 200, 8), torch.randn(1, 4, 200, 8)
    cache.update(k[:, :, :150], v[:, :, :150], 0)
    for t in range(150, 200):
        keys, values = cache.update(k[:, :, t : t + 1], v[:, :, t : t + 1], 0)
    layer = cache.layers[0]
    assert layer.k_codes.shape[2] * 32 == 128 and torch.equal(layer.keys, k[:, :, 128:])
    assert layer.v_codes.shape[2] == 72 and torch.equal(layer.values, v[:, :, 72:])
    assert torch.equal(keys[:, :, 128:], k[:, :, 128:]) and torch.equal(values[:, :, 72:], v[:, :, 72:])
    assert not torch.equal(keys[:, :, :128], k[:, :, :128])


@pytest.mark.parametrize("seq_len", [1, 31, 127, 128, 129, 200, 255, 256, 300])
@pytest.mark.parametrize("bits", [2, 4])
def test_nbytes_matches_the_formula(tiny_model, seq_len, bits):
    cfg = tiny_model.config  # 5 layers, 4 KV heads, head_dim 8
    cache = KIVICache(cfg, bits)
    for i in range(cfg.num_hidden_layers):
        cache.update(torch.randn(1, 4, seq_len, 8), torch.randn(1, 4, seq_len, 8), i)
    assert cache.nbytes() == kivi_bytes(5, 4, 8, seq_len, bits, fp_bytes=4)  # fp32 residual as held
    assert cache.nbytes(fp_bytes=2) == kivi_bytes(5, 4, 8, seq_len, bits, fp_bytes=2)


def test_nbytes_by_hand():
    """256 tokens, KV4, G 32, R 128, head_dim 8, fp16 residual, per layer and KV head:
    keys: 256 tokens quantized = 8 groups x 8 channels x (16 B codes + 2 B scale + 2 B min) = 1280 B, no residual;
    values: 128 quantized tokens x (4 B codes + 4 B) = 1024 B, plus 128 x 8 x 2 B = 2048 B residual."""
    assert kivi_bytes(1, 1, 8, 256, 4, fp_bytes=2) == 1280 + 1024 + 2048
    assert kivi_bytes(5, 4, 8, 256, 4, fp_bytes=2) / 256 == 20 * (1280 + 1024 + 2048) / 256  # 340 B/token


def test_residual_must_be_a_multiple_of_the_group(tiny_model):
    with pytest.raises(ValueError, match="multiple of group_size"):
        KIVICache(tiny_model.config, residual_length=0)
