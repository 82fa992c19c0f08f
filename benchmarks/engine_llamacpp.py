"""Run a GGUF file in llama.cpp (llama-cpp-python) and save the logits of every position as .npy.

Runs in the engine's own venv (`bash scripts/install-llamacpp.sh` prints its python), not the project's; it imports
nothing from the project:

    $ENGINE_PY benchmarks/engine_llamacpp.py model.gguf ids.json logits.npy --type-k q4_0 --type-v q4_0

ids.json: a json list of token ids, evaluated as one batch from an empty cache (the ids are used as given: no BOS is
added). One CPU thread, flash attention on (a quantized V cache needs it). LLAMA_ATTN_ROT_DISABLE=1 in the
environment turns off llama.cpp's Hadamard rotation of a quantized cache. No extra (AMX / repacked) weight buffers.
"""

from __future__ import annotations

import argparse
import json

import llama_cpp.llama_cpp as llama_api
import numpy as np
from llama_cpp import Llama

GGML_TYPES = {"f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 8}  # ggml.h enum ggml_type
_default_model_params = llama_api.llama_model_default_params


def _model_params_without_extra_buffers():
    """llama.cpp's default model parameters with `use_extra_bufts` off (what llama-cli's --no-repack sets): on CPUs
    with AMX the AMX buffer repacks Q4 weights and its matmul crashes this build (SIGSEGV in
    ggml_backend_amx_mul_mat, llama.cpp issue 20824); without it every CPU runs ggml's reference CPU kernels."""
    params = _default_model_params()
    params.use_extra_bufts = False
    return params


llama_api.llama_model_default_params = _model_params_without_extra_buffers  # what `Llama` calls


def engine_logits(model_path: str, ids: list[int], n_ctx: int, type_k: str, type_v: str,
                  flash_attn: bool) -> np.ndarray:
    """(len(ids), vocab) fp32 logits of `ids` evaluated in one batch."""
    llm = Llama(model_path=model_path, logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                type_k=GGML_TYPES[type_k], type_v=GGML_TYPES[type_v], flash_attn=flash_attn, n_threads=1,
                n_threads_batch=1, seed=0, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the .gguf file")
    parser.add_argument("ids", help="json file: a list of token ids")
    parser.add_argument("out", help="where to write the (tokens, vocab) float32 logits (.npy)")
    parser.add_argument("--n-ctx", type=int, default=0, help="context size (default: the number of ids)")
    parser.add_argument("--type-k", choices=GGML_TYPES, default="f16")
    parser.add_argument("--type-v", choices=GGML_TYPES, default="f16")
    parser.add_argument("--no-flash-attn", dest="flash_attn", action="store_false")
    args = parser.parse_args()
    with open(args.ids) as f:
        ids = json.load(f)
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
        parser.error(f"{args.ids}: expected a non-empty json list of token ids")
    n_ctx = args.n_ctx or len(ids)
    if n_ctx < len(ids):
        parser.error(f"--n-ctx {n_ctx} is smaller than the {len(ids)} ids")
    np.save(args.out, engine_logits(args.model, ids, n_ctx, args.type_k, args.type_v, args.flash_attn))


if __name__ == "__main__":
    main()
