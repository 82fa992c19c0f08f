"""The reference of vLLM's int4_per_token_head kernels (`tests/vllm_int4_reference.py`) on cases computed by hand
and against plain fp64 formulas: what `test_target_vllm` relies on."""

import numpy as np
import pytest

from tests import vllm_int4_reference as reference

BF16_STEP = 2.0**-8  # bf16's relative rounding step


def bf16_rows(rows: int, n: int, seed: int = 0) -> np.ndarray:
    return reference.bf16(np.random.default_rng(seed).standard_normal((rows, n)).astype(np.float32))


def test_bf16_rounds_to_nearest_even():
    values = np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-9, -(1 + 2**-8), 3.0], np.float32)
    expected = np.array([1.0, 1 + 2**-6, 1.0, -1.0, 3.0], np.float32)
    assert np.array_equal(reference.bf16(values), expected)


@pytest.mark.parametrize("n", [2, 8, 16, 32, 64, 128, 256])
def test_hadacore_is_the_normalised_hadamard_transform_within_its_bf16_stages(n):
    x = bf16_rows(2**17 // n, n)  # enough values to measure the gain to 1e-5
    exact = x.astype(np.float64) @ reference.sylvester(n) / np.sqrt(n)
    ours = reference.hadacore(x)
    assert np.array_equal(ours, reference.bf16(ours))
    assert np.abs(ours - exact).max() <= 2 * BF16_STEP * np.abs(exact).max()
    if n == 16:  # one stage, entries 0.25: the exact transform rounded once
        assert np.array_equal(ours, reference.bf16(exact.astype(np.float32)))
    # the stages' bf16 entries: 1/sqrt(2) and 1/sqrt(8) rounded down by 1.1e-4 (n = 2, 8, 32, 128), exact otherwise
    gain = (ours * exact).sum() / (exact * exact).sum()
    rounded_entry = {2: 0.70703125 * 2**0.5, 8: 0.353515625 * 8**0.5}.get(n if n < 16 else n // 16, 1.0)
    assert abs(gain - rounded_entry) < 5e-5  # half the 1.1e-4 between the two cases


@pytest.mark.parametrize("head_dim", [64, 96, 128])
def test_rht_forward_and_inverse_give_back_b_times_x(head_dim):
    x = bf16_rows(50, head_dim, seed=1)
    block = reference.rht_block(head_dim)
    assert block == {64: 64, 96: 32, 128: 128}[head_dim]
    round_trip = reference.single_rht(reference.single_rht(x), inverse=True) / block
    assert np.abs(round_trip - x).max() <= 4 * BF16_STEP * np.abs(x).max()
    np.testing.assert_allclose(reference.exact_unrotate(reference.exact_rotate(x)), x, rtol=0, atol=1e-12)
    np.testing.assert_allclose(reference.single_rht(x), reference.exact_rotate(x),
                               atol=4 * BF16_STEP * np.abs(reference.exact_rotate(x)).max())


def test_write_kernel_codes_scale_and_nibbles_by_hand():
    """min -1.5, max 3: scale 4.5 / 15, zp 5, codes 0, 5, 10, 15; even channel in the low nibble, zp in the scale's
    4 low mantissa bits."""
    nibbles, packed_scale = reference.quantize_head(np.array([-1.5, 0.0, 1.5, 3.0], np.float32))
    assert list(nibbles) == [0x50, 0xFA]
    scale = np.float32(4.5) / np.float32(15)
    scale_bits = int(np.array([scale], np.float32).view(np.int32)[0])
    assert int(np.array([packed_scale], np.float32).view(np.int32)[0]) == (scale_bits & -16) | 5
    even, odd, zero_point, read_scale = reference.unpack(nibbles, packed_scale)
    assert list(even) == [0, 10] and list(odd) == [5, 15] and zero_point == 5
    assert read_scale == np.array([scale_bits & -16], np.int32).view(np.float32)[0] < scale
    np.testing.assert_array_equal(reference.dequantize(nibbles, packed_scale), read_scale * np.array([-5, 0, 5, 10]))


def test_write_kernel_rounds_halves_away_from_zero_and_floors_the_scale():
    nibbles, packed_scale = reference.quantize_head(np.array([0.0, 2.5, 15.0, 7.5], np.float32))  # scale 1, zp 0
    even, odd, zero_point, _ = reference.unpack(nibbles, packed_scale)
    assert list(even) == [0, 15] and list(odd) == [3, 8] and zero_point == 0
    assert reference.tie_distance(np.array([0.0, 2.5, 15.0, 7.5], np.float32))[1] == 0
    for value, code, zero in ((0.5, 15, 0), (-2.0, 0, 15), (0.0, 0, 0)):  # constant heads: scale 1e-6
        even, odd, zero_point, read_scale = reference.unpack(*reference.quantize_head(np.full(4, value, np.float32)))
        assert set(even) | set(odd) == {code} and zero_point == zero
        assert read_scale <= np.float32(1e-6) < read_scale + 16 * np.spacing(read_scale)


def test_attention_is_softmax_over_the_dequantized_cache_of_tokens_up_to_each_query():
    tokens, heads, kv_heads, head_dim = 6, 4, 2, 64
    query, key, value = (bf16_rows(tokens * h, head_dim, seed).reshape(tokens, h, head_dim)
                         for seed, h in ((2, heads), (3, kv_heads), (4, kv_heads)))
    ours = reference.attention(query, key, value, head_dim**-0.5, exact_output=True)
    rotated_query = reference.bf16(reference.single_rht(query)).astype(np.float64)
    keys = np.array([[reference.dequantize(*head) for head in reference.write_token(k)] for k in key])
    values = np.array([[reference.dequantize(*head) for head in reference.write_token(v)] for v in value])
    for i in range(tokens):
        for head in range(heads):
            kv_head = head // (heads // kv_heads)
            scores = keys[: i + 1, kv_head] @ rotated_query[i, head] * head_dim**-0.5 / head_dim
            probs = np.exp(scores - scores.max())
            expected = reference.exact_unrotate(probs @ values[: i + 1, kv_head] / probs.sum())
            np.testing.assert_allclose(ours[i, head], expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    engine = reference.attention(query, key, value, head_dim**-0.5)
    assert np.array_equal(engine, reference.bf16(engine))
    assert 0 < np.abs(engine - ours).max() <= 4 * BF16_STEP * np.abs(ours).max()
