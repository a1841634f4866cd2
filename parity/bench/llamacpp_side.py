#!/usr/bin/env python3
"""The llama.cpp side of the benchmark: one GGUF, one prompt of N positions, greedy decoding, timed.
Runs in the llama.cpp peer's environment (`scripts/setup-llama-cpp.sh`), as its own process so that its
peak RSS is its own; bench.py starts it.

    python parity/bench/llamacpp_side.py --model F.gguf --tokens IDS.json --new-tokens 32 --threads 2 --out R.json

Through llama.cpp's C API as llama-cli drives it: the model and context take llama.cpp's defaults
(memory-mapped weights, its batch sizes, flash attention as it decides) except the context length,
which is the prompt plus the new tokens, and the thread counts. The prompt goes to one llama_decode
(llama.cpp splits it into its micro-batches); each new token is the argmax of the last logits and one
llama_decode of one token. Times are wall clock around those calls; llama.cpp's own counters come too.
"""
import argparse
import json
import os
import sys
import time

import llama_cpp as L
import numpy as np


def fail(message):
    sys.stderr.write(f"llamacpp_side: {message}\n")
    sys.exit(2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--tokens", required=True, help="JSON list of prompt token ids (BOS first)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--no-extra-buffers", action="store_true",
                   help="use_extra_bufts = false (llama.cpp's AMX and repacked-weight CPU buffers off)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    with open(args.tokens) as f:
        tokens = json.load(f)
    if not tokens or args.new_tokens < 1:
        fail("needs a prompt and at least one new token")

    L.llama_backend_init()
    t0 = time.perf_counter()
    mparams = L.llama_model_default_params()
    if args.no_extra_buffers:
        mparams.use_extra_bufts = False
    model = L.llama_model_load_from_file(args.model.encode(), mparams)
    if not model:
        fail(f"llama.cpp could not load {args.model}")
    cparams = L.llama_context_default_params()
    cparams.n_ctx = len(tokens) + args.new_tokens
    cparams.n_batch = max(cparams.n_batch, len(tokens))  # the whole prompt in one llama_decode
    cparams.n_threads = args.threads
    cparams.n_threads_batch = args.threads
    cparams.no_perf = False  # llama.cpp's own counters, reported beside the wall clock
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        fail("llama.cpp could not create a context")
    load_seconds = time.perf_counter() - t0
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))

    def decode(ids):
        arr = (L.llama_token * len(ids))(*ids)
        rc = L.llama_decode(ctx, L.llama_batch_get_one(arr, len(ids)))
        if rc != 0:
            fail(f"llama_decode returned {rc}")

    def argmax_last():
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        return int(np.argmax(logits))

    t_prompt = time.perf_counter()
    decode(tokens)
    out = [argmax_last()]
    t_first = time.perf_counter()
    for _ in range(args.new_tokens - 1):
        decode([out[-1]])
        out.append(argmax_last())
    t_end = time.perf_counter()
    perf = L.llama_perf_context(ctx)
    result = {
        "load_seconds": load_seconds,
        "prefill_seconds": t_first - t_prompt,
        "prefill_positions": len(tokens),
        "decode_seconds": t_end - t_first,
        "new_tokens": len(out),
        "decode_ms_per_token": 1000 * (t_end - t_first) / (len(out) - 1) if len(out) > 1 else None,
        "output_ids": out,
        "n_batch": cparams.n_batch,
        "n_ubatch": cparams.n_ubatch,
        "flash_attn_type": cparams.flash_attn_type,
        "use_extra_bufts": bool(mparams.use_extra_bufts),
        "llama_cpp_counters": {"prompt_ms": perf.t_p_eval_ms, "prompt_tokens": perf.n_p_eval,
                               "eval_ms": perf.t_eval_ms, "eval_tokens": perf.n_eval},
        "system_info": L.llama_print_system_info().decode("utf-8", "replace").strip(),
        "llama_cpp_python": L.__version__ if hasattr(L, "__version__") else None,
    }
    with open(args.out + ".part", "w") as f:
        json.dump(result, f)
    os.replace(args.out + ".part", args.out)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
