import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from wkvq_core.artifact import packed_state_dict
from wkvq_core.calib.calibrate import Precision, calibrate_, calibration_state
from wkvq_core.calib.checkpoint import DirectoryCheckpoints
from wkvq_core.calib.data import calibration_samples, eval_windows
from wkvq_core.calib.progress import CalibrationCallbacks, EventKind
from wkvq_core.config import CalibConfig, KVQuantConfig, WeightQuantConfig, WKVQuantConfig
from wkvq_core.errors import CalibrationCancelled, ConfigError
from wkvq_core.evaluation.perplexity import EvalMode, perplexity
from wkvq_core.model import decoder_layers, prepare_model_, quant_state
from wkvq_core.pipeline import quantize_model_


def config(weight_options: dict | None = None, **calib) -> WKVQuantConfig:
    return WKVQuantConfig(
        weight=WeightQuantConfig(bits=4, group_size=-1, **(weight_options or {})),
        kv=KVQuantConfig(bits=4),
        calib=CalibConfig(**{"nsamples": 4, "seqlen": 64, "epochs": 2, "crr_k": 2} | calib),
    )


def state_bytes(model) -> bytes:
    return save(calibration_state(model))


class Recorder:
    def __init__(self, cancel_after_block: int | None = None):
        self.events, self.cancel_after_block = [], cancel_after_block

    def __call__(self, event):
        self.events.append(event)

    def should_cancel(self) -> bool:
        ends = [e.block for e in self.events if e.kind == EventKind.BLOCK_END]
        return self.cancel_after_block is not None and bool(ends) and ends[-1] >= self.cancel_after_block

    def blocks(self, kind):
        return [e.block for e in self.events if e.kind == kind]


def run(model, cfg, samples, checkpoints=None, cancel_after_block=None):
    rec = Recorder(cancel_after_block)
    callbacks = CalibrationCallbacks(on_event=rec, should_cancel=rec.should_cancel, checkpoints=checkpoints)
    report = quantize_model_(model, cfg, samples, callbacks=callbacks)
    return report, rec


@pytest.mark.slow
@pytest.mark.parametrize("weight_options", [{}, {"gptq": True}, {"equalize": True, "gptq": True}],
                         ids=["paper", "gptq", "equalize+gptq"])
def test_resume_after_interruption_is_byte_identical(tiny_model, calib_ids, tmp_path, weight_options):
    """Also what the artifact stores: the options beyond the paper are rerun on resume from the same inputs."""
    cfg = config(weight_options)
    samples = calibration_samples(calib_ids, 4, 64, seed=0)
    reference_model = copy.deepcopy(tiny_model)
    reference_report, rec = run(reference_model, cfg, samples, DirectoryCheckpoints(tmp_path / "a"))
    assert rec.blocks(EventKind.BLOCK_END) == [0, 1, 2, 3, 4]

    interrupted = copy.deepcopy(tiny_model)
    with pytest.raises(CalibrationCancelled):
        run(interrupted, cfg, samples, DirectoryCheckpoints(tmp_path / "b"), cancel_after_block=1)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["block-0000.safetensors", "block-0001.safetensors"]

    report, rec = run(tiny_model, cfg, samples, DirectoryCheckpoints(tmp_path / "b"))
    assert rec.blocks(EventKind.BLOCK_RESUMED) == [0, 1]
    assert report.block_losses == reference_report.block_losses
    assert rec.blocks(EventKind.BLOCK_START) == [2, 3, 4]  # no finished block redone
    assert report.resumed_blocks == 2
    assert state_bytes(tiny_model) == state_bytes(reference_model)
    assert save(packed_state_dict(tiny_model)) == save(packed_state_dict(reference_model))
    for i in range(5):
        assert (tmp_path / "a" / f"block-{i:04d}.safetensors").read_bytes() == (
            tmp_path / "b" / f"block-{i:04d}.safetensors"
        ).read_bytes()


def test_checkpoints_of_another_config_are_refused(tiny_model, calib_ids, tmp_path):
    samples = calibration_samples(calib_ids, 4, 64, seed=0)
    with pytest.raises(CalibrationCancelled):
        run(copy.deepcopy(tiny_model), config(epochs=1), samples, DirectoryCheckpoints(tmp_path), cancel_after_block=0)
    with pytest.raises(ConfigError, match="another configuration"):
        run(tiny_model, config(epochs=1, seed=1), samples, DirectoryCheckpoints(tmp_path))


def test_progress_events_and_loss_decrease(tiny_model, calib_ids):
    cfg = config(epochs=3, crr_k=1, loss="mse")
    report, rec = run(tiny_model, cfg, calibration_samples(calib_ids, 4, 64, seed=0))
    epochs = [e for e in rec.events if e.kind == EventKind.EPOCH_END]
    assert [(e.block, e.epoch) for e in epochs] == [(b, ep) for b in range(5) for ep in (1, 2, 3)]
    assert all(e.n_blocks == 5 and e.epochs == 3 for e in epochs)
    first, last = epochs[0].loss, epochs[2].loss
    assert last < first
    assert report.block_losses[0] == pytest.approx(last)


def reference_crr_loss(model, samples, block, k, distance):
    """The CRR loss by its definition, from whole-model hidden states: quantized blocks 0..block, then blocks
    block+1..block+k-1 unquantized, versus the full-precision model after block+k blocks."""
    layers = decoder_layers(model)
    stop = min(block + k, len(layers))
    final_norm_input = []
    model.model.norm.register_forward_hook(lambda mod, args, out: final_norm_input.append(args[0]))
    total = 0.0
    for ids in samples:
        with quant_state(model, weights=False, kv=False):
            hidden = model.model(ids[None], output_hidden_states=True, use_cache=False).hidden_states
        target = hidden[stop] if stop < len(layers) else final_norm_input[-1]  # hidden_states[-1] is normed
        x = model.model.embed_tokens(ids[None])
        pos = model.model.rotary_emb(x, torch.arange(ids.numel())[None])
        for i in range(stop):
            with quant_state(layers[i], weights=i <= block, kv=i <= block):
                x = layers[i](x, attention_mask=None, position_embeddings=pos)
        total += distance(x, target).item()
    return total / len(samples)


@pytest.mark.parametrize("k,loss,block,compute", [(3, "mae", 0, "float32"), (3, "mae", 1, "float32"),
                                                  (3, "mae", 4, "float32"), (1, "mse", 2, "float32"),
                                                  (3, "mae", 1, "bfloat16")])
def test_crr_loss_is_the_distance_after_k_blocks(tiny_model, calib_ids, k, loss, block, compute):
    """bfloat16: autocast, with the window's fixed blocks holding bf16 copies of their weights, to bf16's precision."""
    cfg = config(epochs=1, crr_k=k, loss=loss, compute_dtype=compute)
    cfg.weight.lr = cfg.kv.lr = 0.0  # parameters stay at their init, so the reported loss can be recomputed
    samples = calibration_samples(calib_ids, 4, 64, seed=0)
    _, rec = run(tiny_model, cfg, samples)
    reported = [e.loss for e in rec.events if e.kind == EventKind.EPOCH_END and e.block == block][0]
    distance = torch.nn.functional.l1_loss if loss == "mae" else torch.nn.functional.mse_loss
    expected = reference_crr_loss(tiny_model, samples, block, k, distance)
    assert reported == pytest.approx(expected, rel=1e-4 if compute == "float32" else 1e-2)


def test_bfloat16_on_a_cpu_without_native_bf16_matmuls_warns():
    """Without AMX or avx512_bf16 (the CPU's own flags) torch emulates bf16 matmuls: 17x slower than float32 on an
    AVX2 EPYC (benchmarks/RESULTS.md); with them, bf16 is the faster choice and nothing is said."""
    flags = set(re.findall(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)[0].split())
    native = bool(flags & {"amx_tile", "avx512_bf16"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Precision.resolve(CalibConfig(compute_dtype="bfloat16"), "cpu")
        Precision.resolve(CalibConfig(), "cpu")
    assert [str(w.message).split(":")[0] for w in caught] == (
        [] if native else ["compute_dtype bfloat16 on a CPU without native bf16 matmuls (AMX, avx512_bf16)"])


@pytest.mark.slow
def test_lwc_improves_over_rtn_on_held_out_text(tiny_model, calib_ids, eval_ids):
    windows = eval_windows(eval_ids, 256)[:24]

    def weight_only(lwc: bool, epochs: int) -> float:
        cfg = WKVQuantConfig(
            weight=WeightQuantConfig(bits=3, group_size=-1, lwc=lwc),
            kv=KVQuantConfig(bits=16),
            calib=CalibConfig(nsamples=16, seqlen=128, epochs=epochs, crr_k=1, loss="mse"),
        )
        model = copy.deepcopy(tiny_model)
        quantize_model_(model, cfg, calibration_samples(calib_ids, 16, 128, seed=0))
        return perplexity(model, windows, EvalMode.W).ppl

    rtn, lwc = weight_only(False, 0), weight_only(True, 3)
    assert lwc < rtn * 0.97, (rtn, lwc)


def test_cancel_stops_between_steps_and_keeps_finished_checkpoints(tiny_model, calib_ids, tmp_path):
    samples = calibration_samples(calib_ids, 4, 64, seed=0)
    with pytest.raises(CalibrationCancelled, match="block 3"):
        run(tiny_model, config(epochs=1), samples, DirectoryCheckpoints(tmp_path), cancel_after_block=2)
    assert len(list(tmp_path.glob("block-*.safetensors"))) == 3


def test_at_most_k_blocks_are_on_the_compute_device(tiny_model, calib_ids):
    """Sequential onloading: track every layer's last `.to(...)` target; "cpu:0" stands for the compute device."""
    compute, k = torch.device("cpu", 0), 2
    cfg = config(epochs=1, crr_k=k)
    prepare_model_(tiny_model, cfg)
    placed = {}
    for i, layer in enumerate(decoder_layers(tiny_model)):
        def to(*args, _i=i, _layer=layer, _orig=layer.to, **kwargs):
            placed[_i] = torch.device(args[0])
            return _orig(*args, **kwargs)
        layer.to = to
    on_device = []

    def record(event):
        if event.kind == EventKind.EPOCH_END:  # while a block trains
            on_device.append(sorted(i for i, d in placed.items() if d == compute))

    calibrate_(tiny_model, cfg, calibration_samples(calib_ids, 4, 64, seed=0), device=compute, offload_device="cpu",
               callbacks=CalibrationCallbacks(on_event=record))
    assert on_device and all(len(blocks) <= k for blocks in on_device), on_device
    assert on_device[0] == [0, 1] and on_device[-1] == [4]
    assert all(d != compute for d in placed.values())  # everything offloaded at the end
