#!/usr/bin/env python3
"""Load through the controller, as users feel it: a controller and one worker (`arcana-serve`) on the
benchmark checkpoint, asked by 1, 8 and 32 concurrent clients, the worker batching answers
(`--limit-model-concurrency N`, its batch as large) against the same worker with `--max-batch 1`
(one answer at a time, as the release's worker), in one run. Run it through
`bash scripts/bench.sh --load` (builds the binary), or directly:

    python parity/bench/load.py [--small] [--mode int8] [--clients 1,8,32] [--requests 32] [--out FILE]

Each round sends --requests requests from --clients clients; every client sends its next request as soon
as its previous answer has ended. Request i is prompt i of a cycle of --text-prompts text questions and
two questions with an image (the repository's test images, as base64 in the release's
`/worker_generate_stream` protocol), template llava_v1, greedy, --new-tokens new tokens. The requests ask
`logprobs: true`, so that each NUL-separated chunk carries one entry per token since the previous chunk.
Figures per round:

- requests/s: requests over the round's wall time;
- time to first token p50/p99: from sending a request to its first chunk, queueing included;
- decode tokens/s per stream: each stream's own rate, its tokens after the first chunk over the time
  from its first to its last chunk (median and slowest stream);
- same text as alone: answers equal to the answer the 1-client round gave for the same prompt (answers
  computed beside others in int8 may differ, see the README).

Then, for each number of clients, batched / max-batch 1. Target (issue 20): 32 clients >= 4x the
requests/s of --max-batch 1, with a p99 time to first token no worse.
"""
import argparse
import base64
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (the checkpoint, the machine facts)
from batch import MODES, free_port  # noqa: E402  (the same weight modes as the batching benchmark)

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
TEXT_QUESTIONS = [
    "What should I pack for a weekend by a lake?",
    "Name three colors and one thing of each color.",
    "How do I keep a wooden dock from getting slippery?",
    "Write a short poem about the sea.",
    "What is the difference between a lake and a pond?",
    "Give me two tips for taking photos at sunset.",
    "Why is the sky blue?",
    "Count from one to ten in words.",
    "What time of day is best for fishing?",
    "Explain what a pier is to a child.",
    "List three animals that live near water.",
    "What is a good name for a small boat?",
    "How far can sound travel over calm water?",
    "Suggest a breakfast for a camping trip.",
]
IMAGES = [("tests/fixtures/preprocess/images/rgb_500x336.png", "What is in this image?"),
          ("tests/fixtures/preprocess/images/jpeg_baseline_444_161x121.jpg", "Describe the picture.")]
MODEL = "arcana-v1-bench"


def get_json(url, body=None, timeout=10):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read())


def wait_for(what, timeout, processes, check):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for name, p in processes:
            if p.poll() is not None:
                raise RuntimeError(f"the {name} exited with {p.returncode} while waiting for {what}")
        try:
            if check():
                return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"no {what} after {timeout} s")


def prompts():
    """The cycle of requests: the text questions, then the image questions (bodies without `model`)."""
    bodies = [{"prompt": f"{SYSTEM} USER: {q} ASSISTANT:", "images": []} for q in TEXT_QUESTIONS]
    for path, question in IMAGES:
        with open(os.path.join(bench.REPO, path), "rb") as f:
            image = base64.b64encode(f.read()).decode()
        bodies.append({"prompt": f"{SYSTEM} USER: <image>\n{question} ASSISTANT:", "images": [image]})
    return bodies


def stream(url, body):
    """One request to `/worker_generate_stream`: its first and last chunk's times (from sending), its
    tokens in the first chunk and in all, its final text."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(url + "/worker_generate_stream", data=data,
                                     headers={"Content-Type": "application/json"})
    sent = time.perf_counter()
    result = {"first": None, "last": None, "first_tokens": 0, "tokens": 0, "text": None}
    buffer = b""
    with urllib.request.urlopen(request, timeout=3600) as r:
        while True:
            piece = r.read1(65536)
            if not piece:
                break
            buffer += piece
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                at = time.perf_counter() - sent
                chunk = json.loads(raw)
                if chunk.get("error_code", 0) != 0:
                    raise RuntimeError(f"error chunk: {chunk.get('text')!r}")
                result["tokens"] += len((chunk.get("logprobs") or {}).get("content") or [])
                if result["first"] is None:
                    result["first"], result["first_tokens"] = at, result["tokens"]
                result["last"], result["text"] = at, chunk["text"]
    if result["first"] is None:
        raise RuntimeError("an answer without any chunk")
    return result


def decode_rate(r):
    seconds, tokens = r["last"] - r["first"], r["tokens"] - r["first_tokens"]
    return tokens / seconds if tokens > 0 and seconds > 0 else None


def percentile(xs, p):
    xs = sorted(xs)
    return xs[round((len(xs) - 1) * p)]


def run_round(url, bodies, clients, requests):
    """`requests` requests from `clients` closed-loop clients; request i is bodies[i % len(bodies)]."""
    results, errors, lock = [None] * requests, [], threading.Lock()
    counter = iter(range(requests))

    def client():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                results[i] = stream(url, bodies[i % len(bodies)])
            except (urllib.error.URLError, OSError, ValueError, RuntimeError) as e:
                with lock:
                    errors.append(f"request {i}: {e}")

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} of {requests} requests failed, first: {errors[0]}")
    rates = [x for x in (decode_rate(r) for r in results) if x is not None]
    firsts = [r["first"] for r in results]
    return {
        "clients": clients, "requests": requests, "wall_s": wall, "requests_per_s": requests / wall,
        "ttft_p50_s": percentile(firsts, 0.5), "ttft_p99_s": percentile(firsts, 0.99),
        "decode_per_stream_median": statistics.median(rates) if rates else None,
        "decode_per_stream_slowest": min(rates) if rates else None,
        "tokens": sum(r["tokens"] for r in results),
        "texts": [r["text"] for r in results],
    }


def run_config(name, worker_flags, args, checkpoint, threads, env, bodies):
    """A controller and one registered worker with `worker_flags`; every round of clients through the
    controller; both stopped at the end."""
    cport, wport = free_port(), free_port()
    controller_url, worker_url = f"http://127.0.0.1:{cport}", f"http://127.0.0.1:{wport}"
    controller_cmd = [args.serve_binary, "controller", "--port", str(cport)]
    worker_cmd = [args.serve_binary, "worker", "--port", str(wport), "--controller-address", controller_url,
                  "--model-path", checkpoint, "--model-name", MODEL, "--threads", str(threads)] \
        + MODES[args.mode] + worker_flags
    row = {"config": name, "command": " ".join(shlex.quote(c) for c in worker_cmd), "rounds": []}
    log = open(os.path.join(args.log_dir, f"load-{name.replace(' ', '-')}.log"), "w")
    processes = []
    try:
        processes.append(("controller", subprocess.Popen(controller_cmd, stdout=log, stderr=subprocess.STDOUT,
                                                         env=env)))
        wait_for("controller", 30, processes, lambda: get_json(controller_url + "/health")["status"] == "ok")
        processes.append(("worker", subprocess.Popen(worker_cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
        wait_for("worker registered with the controller", args.timeout, processes,
                 lambda: get_json(controller_url + "/list_models", {}) == {"models": [MODEL]})
        with_model = [dict(b, model=MODEL, temperature=0, max_new_tokens=args.new_tokens, logprobs=True)
                      for b in bodies]
        # One request of each kind first: the first forward of a shape allocates and packs.
        for b in (with_model[0], with_model[-1]):
            stream(controller_url, b)
        for clients in args.clients:
            print(f"load: {name}: {clients} clients, {args.requests} requests", file=sys.stderr, flush=True)
            result = run_round(controller_url, with_model, clients, args.requests)
            print(f"load: {name}: {clients} clients: {result['requests_per_s']:.3f} requests/s, TTFT p50 "
                  f"{result['ttft_p50_s']:.2f} s p99 {result['ttft_p99_s']:.2f} s, decode tokens/s per stream "
                  f"median {bench.fmt(result['decode_per_stream_median'])}", file=sys.stderr, flush=True)
            row["rounds"].append(result)
    except RuntimeError as e:
        row["error"] = str(e)
    finally:
        for _, p in reversed(processes):
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()
    return row


def same_as_alone(rounds, bodies):
    """Per round: answers equal to the 1-client round's answer for the same prompt (None without it)."""
    alone = next((r for r in rounds if r["clients"] == 1), None)
    if alone is None:
        return [None] * len(rounds)
    reference = {}
    for i, text in enumerate(alone["texts"]):
        reference.setdefault(i % len(bodies), text)
    return [sum(text == reference.get(i % len(bodies)) for i, text in enumerate(r["texts"])) for r in rounds]


def ratio(a, b):
    return a / b if a is not None and b else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="the tiny checkpoint of bench.py --small")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--cache", default=os.environ.get("ARCANA_BENCH_CACHE",
                                                     os.path.expanduser("~/.cache/arcana/bench")))
    p.add_argument("--mode", default="int8", choices=list(MODES))
    p.add_argument("--clients", default="1,8,32", help="comma list of concurrent clients, one round each")
    p.add_argument("--requests", type=int, default=32, help="requests per round")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--text-prompts", type=int, default=14,
                   help=f"text questions in the cycle before the 2 image questions (at most {len(TEXT_QUESTIONS)})")
    p.add_argument("--concurrency", type=int, default=8,
                   help="the worker's --limit-model-concurrency (its batch, when batching)")
    p.add_argument("--threads", type=int, default=None, help="default the physical cores")
    p.add_argument("--worker-flags", default="",
                   help="more flags for both workers, e.g. '--reuse-cache-bytes 2147483648 --prefill-chunk 64'")
    p.add_argument("--serve-binary", default=os.path.join(bench.REPO, "target", "release", "arcana-serve"))
    p.add_argument("--timeout", type=int, default=1800, help="seconds for a worker to load")
    p.add_argument("--out", default=os.path.join(bench.REPO, "bench-results", "load.json"))
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    if not args.clients or min(args.clients) < 1 or args.requests < 1 or args.new_tokens < 2:
        bench.fail("--clients must list numbers >= 1, --requests be >= 1 and --new-tokens >= 2")
    if not 0 <= args.text_prompts <= len(TEXT_QUESTIONS):
        bench.fail(f"--text-prompts must be 0 to {len(TEXT_QUESTIONS)}")
    if not os.access(args.serve_binary, os.X_OK):
        bench.fail(f"no arcana-serve binary at {args.serve_binary}; build it with "
                   f"`cargo build --release --bin arcana-serve` (scripts/bench.sh --load does)")
    threads = args.threads or bench.physical_cores()
    checkpoint = os.path.abspath(args.checkpoint) if args.checkpoint else bench.ensure_checkpoint(
        bench.SMALL if args.small else bench.FULL, 0, args.cache)
    all_bodies = prompts()
    bodies = all_bodies[:args.text_prompts] + all_bodies[len(TEXT_QUESTIONS):]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    args.log_dir = os.path.dirname(os.path.abspath(args.out))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), RUST_LOG="warn")

    facts = bench.machine(threads)
    facts["loadavg_start"] = bench.loadavg()
    extra = shlex.split(args.worker_flags)
    configs = [(f"batch {args.concurrency}", ["--limit-model-concurrency", str(args.concurrency)] + extra),
               ("max-batch 1", ["--limit-model-concurrency", str(args.concurrency), "--max-batch", "1"] + extra)]
    rows = [run_config(name, flags, args, checkpoint, threads, env, bodies) for name, flags in configs]
    facts["loadavg_end"] = bench.loadavg()
    for row in rows:
        for r, same in zip(row["rounds"], same_as_alone(row["rounds"], bodies)):
            r["same_text_as_alone"] = same
    command = " ".join(["python parity/bench/load.py"] + [shlex.quote(a) for a in (argv or sys.argv[1:])])

    print(f"\n## Clients through the controller, batched vs --max-batch 1: `{command}`\n")
    print(f"- machine: {facts['cpu']} ({facts['cpu_features']}), {facts['physical_cores']} physical cores, "
          f"{facts['memory_gib']} GiB, {threads} threads; commit {facts['commit']}; load average "
          f"{facts['loadavg_start']} -> {facts['loadavg_end']}")
    print(f"- checkpoint: {checkpoint}; mode {args.mode} ({' '.join(MODES[args.mode]) or 'fp32'}); "
          f"{args.requests} requests per round cycling {len(bodies) - len(IMAGES)} text and {len(IMAGES)} "
          f"image questions; greedy, {args.new_tokens} new tokens")
    for row in rows:
        print(f"- {row['config']}: `{row['command']}`")
    print()
    print("| worker | clients | requests/s | TTFT p50 s | TTFT p99 s | decode tok/s per stream, median | "
          "slowest | same text as alone |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['config']} | failed: {row['error']} | | | | | | |")
        for r in row["rounds"]:
            same = "" if r["same_text_as_alone"] is None else f"{r['same_text_as_alone']}/{r['requests']}"
            print(f"| {row['config']} | {r['clients']} | {r['requests_per_s']:.3f} | {r['ttft_p50_s']:.2f} | "
                  f"{r['ttft_p99_s']:.2f} | {bench.fmt(r['decode_per_stream_median'])} | "
                  f"{bench.fmt(r['decode_per_stream_slowest'])} | {same} |")
    batched = {r["clients"]: r for r in rows[0]["rounds"]}
    single = {r["clients"]: r for r in rows[1]["rounds"]}
    print(f"\n{rows[0]['config']} / max-batch 1:\n")
    print("| clients | requests/s | TTFT p50 | TTFT p99 | decode tok/s per stream, median |")
    print("|---|---|---|---|---|")
    for clients in args.clients:
        if clients in batched and clients in single:
            b, s = batched[clients], single[clients]
            print(f"| {clients} | {bench.fmt(ratio(b['requests_per_s'], s['requests_per_s']))}x "
                  f"| {bench.fmt(ratio(b['ttft_p50_s'], s['ttft_p50_s']))}x "
                  f"| {bench.fmt(ratio(b['ttft_p99_s'], s['ttft_p99_s']))}x "
                  f"| {bench.fmt(ratio(b['decode_per_stream_median'], s['decode_per_stream_median']))}x |")
    top = max(args.clients)
    if top in batched and top in single:
        gain = ratio(batched[top]["requests_per_s"], single[top]["requests_per_s"])
        p99_ok = batched[top]["ttft_p99_s"] <= single[top]["ttft_p99_s"]
        print(f"\ntarget, {top} clients: requests/s {bench.fmt(gain)}x of max-batch 1 (target >= 4x: "
              f"{'met' if gain and gain >= 4 else 'not met'}); p99 time to first token "
              f"{batched[top]['ttft_p99_s']:.2f} s against {single[top]['ttft_p99_s']:.2f} s "
              f"({'no worse' if p99_ok else 'worse'})")
    with open(args.out, "w") as f:
        json.dump({"command": command, "machine": facts, "checkpoint": checkpoint, "rows": rows}, f, indent=1)
    print(f"\nwritten: {args.out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
