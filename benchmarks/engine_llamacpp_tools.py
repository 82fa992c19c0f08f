"""llama.cpp (llama-cpp-python) work for benchmarks/engines.py, run in the engine's own venv (`bash
scripts/install-llamacpp.sh` prints its python); it imports nothing from the project:

    $ENGINE_PY benchmarks/engine_llamacpp_tools.py nll model.gguf windows.json nll.npy --type-k q4_0 --type-v q4_0
    $ENGINE_PY benchmarks/engine_llamacpp_tools.py quantize f16.gguf out.gguf Q4_K_M [--imatrix imatrix.npz]

nll: windows.json is a json list of equal-length token-id lists; each window is evaluated as one batch from an empty
cache (ids as given, no BOS added) and its tokens 1..n-1 scored from llama.cpp's logits of the previous position:
writes the (windows, n - 1) float64 negative log-likelihoods. One model load for all windows, one CPU thread, flash
attention on (a quantized V cache needs it); LLAMA_ATTN_ROT_DISABLE=1 in the environment turns off llama.cpp's
Hadamard rotation of a quantized cache.
quantize: llama.cpp's own recipe (`llama_model_quantize`, what the llama-quantize tool calls); --imatrix: an importance
matrix (.npz of GGUF weight name -> float32 per input column, what llama-quantize passes after reading a llama-imatrix
file: the mean squared input activation), handed over as the API's `llama_model_imatrix_data` array.
"""

from __future__ import annotations

import argparse
import ctypes
import json

import numpy as np
import llama_cpp
from llama_cpp import Llama

from engine_llamacpp import GGML_TYPES

FTYPES = {"Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "Q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
          "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "Q4_K_S": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_S,
          "Q5_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_0, "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}


def window_nll(model_path: str, windows: list[list[int]], type_k: str, type_v: str) -> np.ndarray:
    n = len(windows[0])
    llm = Llama(model_path=model_path, logits_all=True, n_ctx=n, n_batch=n, n_ubatch=n, type_k=GGML_TYPES[type_k],
                type_v=GGML_TYPES[type_v], flash_attn=True, n_threads=1, n_threads_batch=1, seed=0, verbose=False)
    out = np.empty((len(windows), n - 1))
    for i, ids in enumerate(windows):
        llm.reset()  # the next eval starts at position 0 and drops the cached tokens
        llm.eval(ids)
        logits = np.asarray(llm.scores[: n - 1], dtype=np.float64)
        top = logits.max(-1)
        log_z = np.log(np.exp(logits - top[:, None]).sum(-1)) + top
        out[i] = log_z - logits[np.arange(n - 1), ids[1:]]
    return out


def quantize(source: str, out: str, ftype: str, threads: int, imatrix: str | None) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = FTYPES[ftype], threads
    if imatrix is not None:
        values = {name: np.ascontiguousarray(v, dtype=np.float32) for name, v in np.load(imatrix).items()}
        entries = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()  # the last one (name NULL) ends it
        for entry, (name, v) in zip(entries, values.items()):
            entry.name, entry.size = name.encode(), v.size
            entry.data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = entries
    if llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params)):
        raise SystemExit(f"llama_model_quantize {source} -> {ftype} failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    nll = sub.add_parser("nll", help="per-token NLL of equal-length windows")
    nll.add_argument("model")
    nll.add_argument("windows", help="json file: a list of equal-length token-id lists")
    nll.add_argument("out", help=".npy of (windows, length - 1) float64 NLL")
    nll.add_argument("--type-k", choices=GGML_TYPES, default="f16")
    nll.add_argument("--type-v", choices=GGML_TYPES, default="f16")
    q = sub.add_parser("quantize", help="llama.cpp's quantization of a GGUF")
    q.add_argument("source")
    q.add_argument("out")
    q.add_argument("ftype", choices=FTYPES)
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--imatrix", help=".npz: GGUF weight name -> mean squared input activation per column")
    args = parser.parse_args()
    if args.command == "quantize":
        quantize(args.source, args.out, args.ftype, args.threads, args.imatrix)
        return
    with open(args.windows) as f:
        windows = json.load(f)
    if not windows or len({len(w) for w in windows}) != 1 or len(windows[0]) < 2:
        parser.error(f"{args.windows}: expected a non-empty list of equal-length token-id lists (length >= 2)")
    np.save(args.out, window_nll(args.model, windows, args.type_k, args.type_v))


if __name__ == "__main__":
    main()
