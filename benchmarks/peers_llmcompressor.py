"""llm-compressor worker for `benchmarks/peers.py`: GPTQ or AWQ W4A16 through `oneshot` with the real recipe API.

Runs in its own virtual environment (llm-compressor pins transformers and compressed-tensors below this project's
pins), so it imports nothing from this project: it gets a model directory and calibration token ids (a torch file
of shape (nsamples, seqlen)) and writes a compressed-tensors checkpoint plus a JSON report.

    python benchmarks/peers_llmcompressor.py --method gptq --model DIR --samples calib.pt --out CKPT --report r.json

The preset scheme (W4A16: symmetric int4, group 128; AWQ: W4A16_ASYM, asymmetric, group 128) is tried first,
exactly as a user would write it, with `--group-size` replacing its group when given. If llm-compressor rejects it (a linear whose input size is not a multiple of the
group), the error is recorded and the same scheme is run with one group per output channel ("channel" strategy),
the closest valid grouping.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

import torch


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def recipe(method: str, scheme: str, channelwise: bool, group_size: int | None = None):
    from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme

    if channelwise or group_size:
        grouping = {"strategy": "group", "group_size": group_size} if group_size and not channelwise else {
            "strategy": "channel", "group_size": None}
        weights = preset_name_to_scheme(scheme, ["Linear"]).weights.model_copy(update=grouping)
        quant = dict(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                     ignore=["lm_head"])
    else:
        quant = dict(scheme=scheme, targets=["Linear"], ignore=["lm_head"])
    if method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        return [GPTQModifier(**quant)]
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return [AWQModifier(duo_scaling="both"), QuantizationModifier(**quant)]


def run_oneshot(args, samples: torch.Tensor, channelwise: bool):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.core import reset_session
    from transformers import AutoModelForCausalLM

    reset_session()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    data = Dataset.from_dict({"input_ids": samples.tolist(), "attention_mask": torch.ones_like(samples).tolist()})
    started = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe(args.method, args.scheme, channelwise, args.group_size),
            num_calibration_samples=samples.shape[0], max_seq_length=samples.shape[1],
            shuffle_calibration_samples=False, pipeline="sequential")
    return model, time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=["gptq", "awq"], required=True)
    parser.add_argument("--scheme", help="preset name (default: W4A16 for GPTQ, W4A16_ASYM for AWQ)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--samples", required=True, help="torch file: LongTensor (nsamples, seqlen)")
    parser.add_argument("--out", required=True, help="directory for the compressed checkpoint")
    parser.add_argument("--report", required=True, help="JSON report file")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--group-size", type=int, help="weight group size instead of the preset's 128")
    args = parser.parse_args(argv)
    args.scheme = args.scheme or ("W4A16" if args.method == "gptq" else "W4A16_ASYM")
    torch.set_num_threads(args.threads)
    samples = torch.load(args.samples, weights_only=True)
    report = dict(method=args.method, scheme=args.scheme, preset_error=None, cpu_workaround=None,
                  strategy=f"group {args.group_size or 128}",
                  versions={n: version(n) for n in ("llmcompressor", "compressed-tensors", "transformers", "torch")},
                  python=platform.python_version(), nsamples=samples.shape[0], seqlen=samples.shape[1])
    channelwise, patched, per_row_rss = False, False, reset_peak_rss()
    for _ in range(3):
        try:
            model, seconds = run_oneshot(args, samples, channelwise)
            break
        except Exception as exc:  # a rejection is a result to report
            message = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:600]
            print(traceback.format_exc(), file=sys.stderr)
            if not channelwise and "divisible by group_size" in str(exc):
                report["preset_error"], channelwise, report["strategy"] = message, True, "channel"
            elif not patched and "accelerator" in str(exc):
                # llm-compressor pins cached activations for host-to-device copies; with a CPU-only torch
                # `pin_memory` raises. Pinning is a transfer optimisation only: skip it, changing no number.
                from llmcompressor.pipelines.cache import IntermediatesCache

                IntermediatesCache.pin_memory = lambda self, *a, **k: None
                report["cpu_workaround"] = f"IntermediatesCache.pin_memory made a no-op after {message}"
                patched = True
            else:
                raise
            reset_peak_rss()
    else:
        raise RuntimeError("oneshot did not succeed in 3 attempts")
    report.update(seconds=seconds, peak_memory_bytes=peak_rss_bytes(), peak_memory_per_run=per_row_rss)
    model.save_pretrained(args.out, save_compressed=True)
    config = json.loads((Path(args.out) / "config.json").read_text())
    report["quantization_config"] = config.get("quantization_config")
    Path(args.report).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("method", "scheme", "strategy", "seconds", "preset_error")}))


if __name__ == "__main__":
    main()
