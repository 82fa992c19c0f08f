"""`wkvq export --format gguf`: the GGUF file, read back with the `gguf` package (llama.cpp's gguf-py), holds our
weights as Q4_1 blocks (bit-exact where reported exact, within the reported deviation elsewhere), the model's
hyperparameters and tokenizer; a re-implementation of llama.cpp's llama graph (interleaved RoPE, GQA, attention
biases) run on nothing but the file gives our logits.

Artifacts: a random 2-layer LLaMA (hidden 128, head_dim 64, 2 query heads / 1 KV head, calibrated V smoothing) in
groups of 32 (the block size) and 64 (two blocks per group: shifted codes), with the shipped stories260k tokenizer
(byte-fallback BPE: tokenizer model "llama") and, tied, with a byte-level BPE built here (tokenizer model "gpt2").
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.nn import functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

import wkvq_core
from wkvq_core.artifact import load_quantized, save_artifact
from wkvq_core.calib.data import load_text
from wkvq_core.cli import app
from wkvq_core.config import CalibConfig, KVQuantConfig, WeightQuantConfig, WKVQuantConfig
from wkvq_core.export import NOTES
from wkvq_core.export.gguf import CACHE_TYPE_KEYS, GGUF_FILE, describe, permute_rotary
from wkvq_core.export.gguf import export as export_gguf
from wkvq_core.model import prepare_model_, quant_state
from wkvq_core.pipeline import QuantizeJob, run_quantize_job
from wkvq_core.runtime.packed_linear import PackedLinear

ASSETS = Path(wkvq_core.__file__).parent / "assets"
TINY_MODEL = ASSETS / "stories260k"
CALIB_TEXT = ASSETS / "tinystories" / "calib.txt"
runner = CliRunner()
Q4_1 = gguf.GGMLQuantizationType.Q4_1


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_failure(result, *needles: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A small GPT-2 style BPE with SmolLM's pre-tokenizer (single digits, then byte level)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([load_text(str(CALIB_TEXT))[:20_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def base_model(path, tie: bool = False):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=64, vocab_size=512, max_position_embeddings=256,
                                 rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie)).save_pretrained(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{name: (artifact, export)}: g32 / g64 with the stories260k tokenizer, bpe (g32, tied) with a byte-level one."""
    root = tmp_path_factory.mktemp("export-gguf")
    base, tied = root / "base", root / "base-tied"
    base_model(base)
    AutoTokenizer.from_pretrained(TINY_MODEL).save_pretrained(base)
    base_model(tied, tie=True)
    byte_level_tokenizer().save_pretrained(tied)
    result = {}
    for name, model, group in (("g32", base, 32), ("g64", base, 64), ("bpe", tied, 32)):
        config = WKVQuantConfig(weight=WeightQuantConfig(group_size=group),
                                calib=CalibConfig(nsamples=2, seqlen=32, epochs=1))
        run_quantize_job(QuantizeJob(model=str(model), calib=str(CALIB_TEXT), out=root / name, config=config,
                                     device="cpu"))
        export_gguf(root / name, root / f"{name}-gguf")
        result[name] = (root / name, root / f"{name}-gguf")
    return result


def read(out) -> tuple[gguf.GGUFReader, dict]:
    return gguf.GGUFReader(out / GGUF_FILE), json.loads((out / NOTES).read_text())


def meta(reader: gguf.GGUFReader, key: str):
    field = reader.get_field(key)
    assert field is not None, key
    return field.contents()


def tensor(reader: gguf.GGUFReader, name: str) -> tuple[torch.Tensor, gguf.GGMLQuantizationType]:
    t = next(t for t in reader.tensors if t.name == name)
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()), t.tensor_type


def gguf_name(hf_name: str) -> str:
    i, part, proj = hf_name.split(".")[2:5]
    short = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[proj]
    return f"blk.{i}.{short}"


def expected_rows(hf_name: str, value: torch.Tensor, config) -> torch.Tensor:
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}.get(hf_name.split(".")[-1])
    return value if heads is None else permute_rotary(value, heads)


@pytest.mark.parametrize("which", ["g32", "g64", "bpe"])
def test_the_gguf_holds_our_weights(exported, which):
    artifact, out = exported[which]
    ours = load_quantized(artifact)
    reader, notes = read(out)
    linears = {name: m for name, m in ours.named_modules() if isinstance(m, PackedLinear)}
    assert len(linears) == 14
    inexact_blocks, blocks, max_dev = 0, 0, 0.0
    for hf_name, lin in linears.items():
        name = gguf_name(hf_name)
        weight, qtype = tensor(reader, f"{name}.weight")
        assert qtype == Q4_1
        expected = expected_rows(hf_name, lin.dequantized_weight(), ours.config)
        assert weight.shape == expected.shape
        differs = (weight != expected).reshape(weight.shape[0], -1, 32).any(-1)
        reported = notes["q4_1"]["per_linear"][hf_name]
        assert (int(differs.sum()), differs.numel()) == (reported["inexact_blocks"], reported["blocks"]), hf_name
        deviation = float((weight - expected).abs().max())
        assert deviation == reported["max_abs_deviation"] and deviation < 1e-4, hf_name
        inexact_blocks, blocks, max_dev = inexact_blocks + int(differs.sum()), blocks + differs.numel(), \
            max(max_dev, deviation)
        bias = next((t for t in reader.tensors if t.name == f"{name}.bias"), None)
        if lin.bias is not None and lin.bias.any():
            assert bias is not None and torch.equal(tensor(reader, f"{name}.bias")[0],
                                                    expected_rows(hf_name, lin.bias, ours.config)), hf_name
            assert tensor(reader, f"{name}.bias")[1] == gguf.GGMLQuantizationType.F32
        else:
            assert bias is None, hf_name
    assert {t.name for t in reader.tensors if t.name.endswith(".bias")} == {
        f"blk.{i}.{p}.bias" for i in range(2) for p in ("attn_v", "attn_output")}  # the folded V smoothing
    q4 = notes["q4_1"]
    assert (q4["inexact_blocks"], q4["blocks"], q4["max_abs_deviation"]) == (inexact_blocks, blocks, max_dev)
    assert q4["inexact_fraction"] == inexact_blocks / blocks and 0 < inexact_blocks < blocks
    assert f"{inexact_blocks} of {blocks} blocks ({inexact_blocks / blocks:.1%}) inexact" in describe(out)
    if which == "g64":  # two blocks per group: shifting the codes of a block that does not span 0..15 helps
        assert q4["inexact_blocks"] < q4["inexact_fraction_without_shift"] * blocks

    for gguf_key, hf_value, qtype in (
        ("token_embd.weight", ours.model.embed_tokens.weight, gguf.GGMLQuantizationType.F16),
        ("output_norm.weight", ours.model.norm.weight, gguf.GGMLQuantizationType.F32),
        *((f"blk.{i}.{n}.weight", getattr(layer, m).weight, gguf.GGMLQuantizationType.F32)
          for i, layer in enumerate(ours.model.layers)
          for n, m in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")))):
        value, stored = tensor(reader, gguf_key)
        assert stored == qtype and torch.equal(value, hf_value), gguf_key
    output = [t for t in reader.tensors if t.name == "output.weight"]
    if ours.config.tie_word_embeddings:
        assert not output
    else:
        assert torch.equal(tensor(reader, "output.weight")[0], ours.lm_head.weight)
    assert len(reader.tensors) == 14 + 4 + 4 + 2 + (not ours.config.tie_word_embeddings)


def test_q4_1_block_layout_is_the_packages(exported):
    """Our block bytes: d, m as fp16, then nibbles (low: the first 16 weights), as the package decodes them; and a
    block whose codes span 0..15 comes back the same from the package's own Q4_1 quantizer (its encoder side)."""
    reader, _ = read(exported["g32"][1])
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    blocks = t.data.reshape(-1, 20)
    d, m = blocks[:, :2].copy().view("<f2")[:, 0], blocks[:, 2:4].copy().view("<f2")[:, 0]
    codes = torch.from_numpy(blocks[:, 4:].copy()).to(torch.int64)
    q = torch.cat([codes & 0xF, codes >> 4], dim=1)
    values = q.float() * torch.from_numpy(d.astype("float32"))[:, None] + torch.from_numpy(m.astype("float32"))[:, None]
    assert torch.equal(values.reshape(-1), torch.from_numpy(gguf.quants.dequantize(t.data, Q4_1)).reshape(-1))
    full = (q.amin(1) == 0) & (q.amax(1) == 15)  # the package's quantizer maps min -> 0 and max -> 15
    requant = gguf.quants.quantize(values[full].numpy(), Q4_1)
    assert torch.equal(torch.from_numpy(gguf.quants.dequantize(requant, Q4_1)), values[full])


@pytest.mark.parametrize("which", ["g32", "bpe"])
def test_metadata_is_the_models(exported, which):
    artifact, out = exported[which]
    config = json.loads((artifact / "config.json").read_text())
    reader, notes = read(out)
    assert meta(reader, "general.architecture") == "llama"
    assert meta(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_1
    expected = {"llama.context_length": 256, "llama.embedding_length": 128, "llama.block_count": 2,
                "llama.feed_forward_length": 256, "llama.attention.head_count": 2,
                "llama.attention.head_count_kv": 1, "llama.attention.key_length": 64,
                "llama.attention.value_length": 64, "llama.rope.dimension_count": 64, "llama.vocab_size": 512}
    assert {key: meta(reader, key) for key in expected} == expected
    assert meta(reader, "llama.rope.freq_base") == config["rope_parameters"]["rope_theta"] == 5000.0
    assert math.isclose(meta(reader, "llama.attention.layer_norm_rms_epsilon"), config["rms_norm_eps"], rel_tol=1e-6)
    assert [meta(reader, key) for key in CACHE_TYPE_KEYS] == ["q4_0", "q4_0"]
    assert notes["recommended_cache_type"] == {"k": "q4_0", "v": "q4_0"}
    assert "recommended KV cache: -ctk q4_0 -ctv q4_0" in describe(out)

    hf = AutoTokenizer.from_pretrained(artifact)
    tokens, types = meta(reader, "tokenizer.ggml.tokens"), meta(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == 512
    vocab = hf.get_vocab()
    assert all(tokens[i] == token for token, i in vocab.items())
    assert tokens[len(vocab):] == [f"[PAD{i}]" for i in range(len(vocab), 512)]
    assert set(types[len(vocab):]) == ({gguf.TokenType.UNUSED} if which == "bpe" else set())  # 300 of 512 / 512
    assert types[hf.bos_token_id] == gguf.TokenType.CONTROL
    assert meta(reader, "tokenizer.ggml.bos_token_id") == hf.bos_token_id
    assert meta(reader, "tokenizer.ggml.eos_token_id") == hf.eos_token_id
    assert meta(reader, "tokenizer.ggml.add_bos_token") == (hf("a b")["input_ids"][0] == hf.bos_token_id)
    assert meta(reader, "tokenizer.ggml.add_eos_token") is False
    spec = json.loads((artifact / "tokenizer.json").read_text())["model"]
    if which == "g32":  # stories260k: a byte-fallback BPE, as the converter's "llama" vocab
        assert (meta(reader, "tokenizer.ggml.model"), meta(reader, "tokenizer.ggml.pre")) == ("llama", "default")
        assert meta(reader, "tokenizer.ggml.add_bos_token") is True
        assert meta(reader, "tokenizer.ggml.unknown_token_id") == hf.unk_token_id
        assert types[vocab["<0x0A>"]] == gguf.TokenType.BYTE
        scores = meta(reader, "tokenizer.ggml.scores")
        first_merge = {}  # a token that two merges produce ranks by the earlier one
        for r, m in enumerate(spec["merges"]):
            first_merge.setdefault("".join(m.split(" ", 1) if isinstance(m, str) else m), r)
        assert len(first_merge) < len(spec["merges"])
        assert {t: scores[vocab[t]] for t in first_merge} == {t: -float(r) for t, r in first_merge.items()}
        assert {scores[i] for t, i in vocab.items() if t not in first_merge} == {0.0}
        assert reader.get_field("tokenizer.ggml.merges") is None
    else:  # a byte-level BPE with SmolLM's pre-tokenizer, as the converter's "gpt2" vocab
        assert (meta(reader, "tokenizer.ggml.model"), meta(reader, "tokenizer.ggml.pre")) == ("gpt2", "smollm")
        assert meta(reader, "tokenizer.ggml.add_bos_token") is False
        assert meta(reader, "tokenizer.ggml.merges") == [" ".join(m) if not isinstance(m, str) else m
                                                           for m in spec["merges"]]
        assert reader.get_field("tokenizer.ggml.scores") is None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_interleaved(x: torch.Tensor, base: float, n_rot: int) -> torch.Tensor:
    """llama.cpp's rope for the llama architecture (LLAMA_ROPE_TYPE_NORM): rotates pairs (2i, 2i + 1); x: (T, H, D)."""
    pos = torch.arange(x.shape[0], dtype=torch.float64)[:, None]
    theta = pos * base ** (-torch.arange(0, n_rot, 2, dtype=torch.float64) / n_rot)
    cos, sin = theta.cos().float()[:, None], theta.sin().float()[:, None]
    x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def rope_rotate_half(x: torch.Tensor, base: float, n_rot: int) -> torch.Tensor:
    """HF's rope: rotates pairs (i, i + n_rot / 2)."""
    pos = torch.arange(x.shape[0], dtype=torch.float64)[:, None]
    theta = pos * base ** (-torch.arange(0, n_rot, 2, dtype=torch.float64) / n_rot)
    cos, sin = theta.cos().float()[:, None], theta.sin().float()[:, None]
    x0, x1 = x[..., : n_rot // 2], x[..., n_rot // 2: n_rot]
    return torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)


def gguf_logits(reader: gguf.GGUFReader, ids: torch.Tensor, rope=rope_interleaved, replace=None) -> torch.Tensor:
    """The llama graph computed from the GGUF alone (its metadata and dequantized tensors; `replace`: some tensors
    given instead), in fp32."""
    names, replace = {t.name for t in reader.tensors}, replace or {}
    w = lambda name: replace[name] if name in replace else tensor(reader, name)[0]  # noqa: E731
    b = lambda name: w(name) if name in names else 0.0  # noqa: E731
    n_head, n_kv = meta(reader, "llama.attention.head_count"), meta(reader, "llama.attention.head_count_kv")
    head_dim, n_rot = meta(reader, "llama.attention.key_length"), meta(reader, "llama.rope.dimension_count")
    eps, base = meta(reader, "llama.attention.layer_norm_rms_epsilon"), meta(reader, "llama.rope.freq_base")
    x = w("token_embd.weight")[ids]
    steps = x.shape[0]
    mask = torch.full((steps, steps), float("-inf")).triu(1)
    for i in range(meta(reader, "llama.block_count")):
        h = rms_norm(x, w(f"blk.{i}.attn_norm.weight"), eps)
        q = (h @ w(f"blk.{i}.attn_q.weight").T + b(f"blk.{i}.attn_q.bias")).view(steps, n_head, head_dim)
        k = (h @ w(f"blk.{i}.attn_k.weight").T + b(f"blk.{i}.attn_k.bias")).view(steps, n_kv, head_dim)
        v = (h @ w(f"blk.{i}.attn_v.weight").T + b(f"blk.{i}.attn_v.bias")).view(steps, n_kv, head_dim)
        q, k = rope(q, base, n_rot), rope(k, base, n_rot)
        k, v = k.repeat_interleave(n_head // n_kv, 1), v.repeat_interleave(n_head // n_kv, 1)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(head_dim) + mask
        attn = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(steps, -1)
        x = x + attn @ w(f"blk.{i}.attn_output.weight").T + b(f"blk.{i}.attn_output.bias")
        h = rms_norm(x, w(f"blk.{i}.ffn_norm.weight"), eps)
        x = x + (F.silu(h @ w(f"blk.{i}.ffn_gate.weight").T) * (h @ w(f"blk.{i}.ffn_up.weight").T)) \
            @ w(f"blk.{i}.ffn_down.weight").T
    head = w("output.weight") if "output.weight" in names else w("token_embd.weight")
    return rms_norm(x, w("output_norm.weight"), eps) @ head.T


@pytest.mark.parametrize("which", ["g64", "bpe"])
@torch.no_grad()
def test_the_llama_graph_on_the_gguf_gives_our_logits(exported, which):
    """Checks the q/k permutation against interleaved RoPE, GQA, the folded V smoothing and the names together."""
    artifact, out = exported[which]
    ours = load_quantized(artifact)
    ids = torch.randint(0, ours.config.vocab_size, (24,))
    with quant_state(ours, weights=True, kv=False):  # packed weights, full-precision KV cache
        expected = ours(ids[None], use_cache=False).logits[0]
    reader, scale = read(out)[0], float(expected.abs().max())
    exact = {f"{gguf_name(name)}.weight": expected_rows(name, m.dequantized_weight(), ours.config)
             for name, m in ours.named_modules() if isinstance(m, PackedLinear)}
    # the file's layout and metadata with our exact weights: the same logits up to fp32 rounding
    torch.testing.assert_close(gguf_logits(reader, ids, replace=exact), expected, atol=2e-6 * scale, rtol=0)
    # the file's Q4_1 weights: off by what the inexact blocks change (their weights by < 1e-4)
    logits = gguf_logits(reader, ids)
    torch.testing.assert_close(logits, expected, atol=2e-3 * scale, rtol=0)
    # llama.cpp's interleaved RoPE needs the permuted q / k rows: HF's rotate_half on them is far off
    unpermuted = gguf_logits(reader, ids, rope=rope_rotate_half, replace=exact)
    assert (unpermuted - expected).abs().max() > 1e-3 * scale


def test_unquantized_weights_export_as_f16(tmp_path):
    """A KV-only artifact (w_bits 16, calibrated V smoothing folded into v_proj / o_proj): its linears as F16 tensors
    equal to the stored fp16 weights (q / k rows permuted), and the llama graph on the file gives our logits."""
    base = tmp_path / "base"
    base_model(base)
    AutoTokenizer.from_pretrained(TINY_MODEL).save_pretrained(base)
    config = WKVQuantConfig(weight=WeightQuantConfig(bits=16), calib=CalibConfig(nsamples=2, seqlen=32, epochs=1))
    run_quantize_job(QuantizeJob(model=str(base), calib=str(CALIB_TEXT), out=tmp_path / "kv-only", config=config,
                                 device="cpu"))
    out = export_gguf(tmp_path / "kv-only", tmp_path / "gguf")
    ours = load_quantized(tmp_path / "kv-only")
    reader, notes = read(out)
    assert meta(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert notes["q4_1"] is None and notes["scheme"] == "unquantized linears (F16)"
    assert describe(out).startswith("gguf model.gguf, llama, unquantized linears (F16): exact; recommended KV cache: "
                                    "-ctk q4_0 -ctv q4_0")
    linears = {name: m for name, m in ours.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name}
    assert len(linears) == 14
    for hf_name, lin in linears.items():
        weight, qtype = tensor(reader, f"{gguf_name(hf_name)}.weight")
        assert qtype == gguf.GGMLQuantizationType.F16, hf_name
        assert torch.equal(weight, expected_rows(hf_name, lin.weight, ours.config)), hf_name
    assert {t.name for t in reader.tensors if t.name.endswith(".bias")} == {
        f"blk.{i}.{p}.bias" for i in range(2) for p in ("attn_v", "attn_output")}  # the folded V smoothing
    ids = torch.randint(0, ours.config.vocab_size, (24,))
    with torch.no_grad(), quant_state(ours, weights=True, kv=False):
        expected = ours(ids[None], use_cache=False).logits[0]
        logits = gguf_logits(reader, ids)
    torch.testing.assert_close(logits, expected, atol=2e-6 * float(expected.abs().max()), rtol=0)


def small_artifact(path, model, tokenizer, **options):
    config = WKVQuantConfig(**options)
    prepare_model_(model, config)
    return save_artifact(path, model, tokenizer, config)


def test_cli_exports_and_refuses_what_gguf_cannot_hold(exported, tmp_path, tiny_model, tokenizer):
    artifact, _ = exported["g64"]
    result = invoke("export", "--format", "gguf", artifact, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {tmp_path / 'out'} (gguf model.gguf, llama, Q4_1 from W4A16 asymmetric, "
                                    "group 64")
    assert "recommended KV cache: -ctk q4_0 -ctv q4_0; not expressed: kv_cache_quantization, poq, k_smoothing" \
        in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [GGUF_FILE, NOTES]

    row = small_artifact(tmp_path / "row", tiny_model, tokenizer, weight=WeightQuantConfig(group_size=-1, lwc=False))
    assert_clean_failure(invoke("export", "--format", "gguf", row, tmp_path / "x"),
                         "model.layers.0.mlp.down_proj: per-row groups of 172 input channels are not a multiple of "
                         "Q4_1's 32-weight blocks")
    fresh = lambda: LlamaForCausalLM.from_pretrained(artifact.parent / "base", dtype=torch.float32)  # noqa: E731
    cases = [
        ({"weight": WeightQuantConfig(group_size=16, lwc=False)}, "model.layers.0.self_attn.q_proj: groups of 16"),
        ({"weight": WeightQuantConfig(bits=3, group_size=32, lwc=False)}, "3-bit weights; Q4_1 holds 4-bit codes"),
        ({"weight": WeightQuantConfig(group_size=32, lwc=False), "act_bits": 8}, "activations are quantized to 8"),
        ({"weight": WeightQuantConfig(group_size=32, lwc=False), "kv": KVQuantConfig(rotate=True)}, "kv rotate"),
    ]
    hf_tokenizer = AutoTokenizer.from_pretrained(artifact)
    for n, (options, needle) in enumerate(cases):
        bad = small_artifact(tmp_path / f"bad{n}", fresh(), hf_tokenizer, **options)
        assert_clean_failure(invoke("export", "--format", "gguf", bad, tmp_path / "x"), needle)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))  # nothing written
    (tmp_path / "file").write_text("x")
    assert_clean_failure(invoke("export", "--format", "gguf", artifact, tmp_path / "file"),
                         "exists and is not a directory")
