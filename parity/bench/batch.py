#!/usr/bin/env python3
"""Concurrent streams through the worker's continuous batching: one `arcana-serve worker` per mode on
the benchmark checkpoint, its OpenAI API asked by N clients at once, against the same requests one at
a time. Run it through `bash scripts/bench.sh --batch` (builds the binaries), or directly:

    python parity/bench/batch.py [--small] [--streams 8] [--modes exact,int8] [--out FILE]

Each request: the image (as a data: URL), one of N questions, greedy, --new-tokens tokens (streamed).
Solo: the requests one after another, each alone in the batch. Together: all N submitted at once; the
worker prefills each as it arrives (one at a time) and decodes every running answer in one forward
per token. Figures:

- decode tokens/s: tokens that arrived while every stream was decoding (from the last stream's first
  token to the first stream's last token), per second of that window; solo: each answer's tokens after
  its first, per second, averaged over the requests.
- gain: together / solo, the aggregate decode speed-up.
- step tokens/s: the same rounds counted by the worker's `/metrics` (tokens its decoding steps made over
  those steps' seconds): the engine's decode rate over the whole round, not only the window above.
- same text: answers equal to their solo answer (greedy; the batch's GEMMs sum in another order than
  one row's, so near-ties may go another way).
- time to first token: the first solo request's, and the median of the later ones (the same image
  with other questions: with `--reuse-cache-bytes`, these reuse its features and the prompt's start).
- joining (`--stagger S`): the requests submitted S seconds apart; each stream's own decode rate (first
  to last token), summed, over the solo rate: what users see while others join.
- constraint share: the same requests again under a JSON schema (`response_format`), first one alone,
  then all N at once; the worker's `/metrics` counts the time its decoding steps spend in the
  constraints (masks and advances) and in the steps themselves: constraint seconds / step seconds, and
  the constraint's microseconds per constrained token (`--no-constrained` skips these rounds).
"""
import argparse
import base64
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (the checkpoint, the machine facts, the image)

QUESTIONS = [
    bench.QUESTION,
    "Describe this image in detail.",
    "What time of day does this look like, and why?",
    "Is it safe to swim here? Explain.",
    "What could a photographer do to improve this picture?",
    "List every object you can see.",
    "Write a short poem about this place.",
    "What season is it likely to be?",
]
# Long enough to constrain every token of the answer: the caption is a free string.
SCHEMA = {"type": "object", "properties": {"caption": {"type": "string"},
                                           "objects": {"type": "array", "items": {"type": "string"}}},
          "required": ["caption", "objects"], "additionalProperties": False}
MODES = {"exact": [], "int8": ["--load-8bit", "--merge-lora"], "fp16": ["--dtype", "fp16", "--merge-lora"],
         "int4": ["--load-4bit", "--merge-lora"]}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url, process, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the worker exited with {process.returncode} while loading")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the worker was not ready after {timeout} s")


def stream_answer(url, image_url, question, new_tokens, result, schema=None):
    """One streamed chat completion; `result` gets the text and each chunk's arrival time."""
    body = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": question},
                                                  {"type": "image_url", "image_url": {"url": image_url}}]}],
        "temperature": 0, "max_tokens": new_tokens, "stream": True,
    }
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}
    body = json.dumps(body).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    result.update(sent=time.perf_counter(), arrivals=[], text="")
    try:
        with urllib.request.urlopen(request, timeout=3600) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                choice = (chunk.get("choices") or [{}])[0]
                delta = choice.get("delta", {}).get("content")
                if delta:
                    result["text"] += delta
                    result["arrivals"].append(time.perf_counter())
                if choice.get("finish_reason"):
                    result["finish_reason"] = choice["finish_reason"]
    except (urllib.error.URLError, OSError, ValueError) as e:
        result["error"] = str(e)


def solo_rate(result):
    times = result["arrivals"]
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None


def together_rate(results):
    """Chunks that arrived while every stream was decoding, per second."""
    start = max(r["arrivals"][0] for r in results)
    end = min(r["arrivals"][-1] for r in results)
    if end <= start:
        return None, 0.0
    count = sum(1 for r in results for t in r["arrivals"] if start < t <= end)
    return count / (end - start), end - start


def decode_counters(url):
    """The worker's decoding-step counters from /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        lines = r.read().decode().splitlines()
    names = ("arcana_decode_steps_total", "arcana_decode_tokens_total", "arcana_decode_step_seconds_total", "arcana_constrained_tokens_total",
             "arcana_constraint_seconds_total")
    values = {}
    for line in lines:
        name, _, value = line.partition(" ")
        if name in names:
            values[name] = float(value)
    missing = [n for n in names if n not in values]
    if missing:
        raise RuntimeError(f"/metrics lacks {', '.join(missing)}")
    return values


def step_rate(before, after):
    """Tokens per second of the worker's decoding steps between two readings of its counters: the
    engine's own decode rate, prefill and the HTTP path left out."""
    tokens = after["arcana_decode_tokens_total"] - before["arcana_decode_tokens_total"]
    seconds = after["arcana_decode_step_seconds_total"] - before["arcana_decode_step_seconds_total"]
    return tokens / seconds if seconds > 0 else None


def constraint_share(url, image_url, questions, new_tokens):
    """Runs `questions` at once under SCHEMA; the constraints' share of the decoding steps' time."""
    before = decode_counters(url)
    results = [{} for _ in questions]
    clients = [threading.Thread(target=stream_answer, args=(url, image_url, q, new_tokens, r, SCHEMA))
               for q, r in zip(questions, results)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"a constrained answer failed: {errors[0]}")
    for r in results:
        try:
            json.loads(r["text"])
        except ValueError:
            # Cut at --new-tokens inside the structure: still a prefix the schema allows.
            if r.get("finish_reason") != "length":
                raise RuntimeError(f"a constrained answer that is not JSON: {r['text']!r}")
    after = decode_counters(url)
    delta = {k: after[k] - before[k] for k in after}
    steps, step_s = delta["arcana_decode_steps_total"], delta["arcana_decode_step_seconds_total"]
    tokens, constraint_s = delta["arcana_constrained_tokens_total"], delta["arcana_constraint_seconds_total"]
    if not steps or not tokens:
        raise RuntimeError("the constrained round ran no decoding step")
    return {"share": constraint_s / step_s, "us_per_token": constraint_s / tokens * 1e6,
            "step_ms": step_s / steps * 1e3, "tokens": int(tokens), "steps": int(steps)}


def table_head(intro, columns):
    """A paragraph, then a Markdown table's header."""
    print(f"\n{intro}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))


def own_rates(results):
    """Each stream's own decode rate, from its first to its last token."""
    return [solo_rate(r) or 0.0 for r in results]


def run_staggered(url, image_url, questions, new_tokens, stagger):
    """The questions submitted one after another, `stagger` seconds apart, while the earlier ones decode."""
    results = [{} for _ in questions]
    clients = [threading.Thread(target=stream_answer, args=(url, image_url, q, new_tokens, r))
               for q, r in zip(questions, results)]
    for c in clients:
        c.start()
        time.sleep(stagger)
    for c in clients:
        c.join()
    return results


def run_mode(mode, args, checkpoint, image_url, threads, env):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [args.serve_binary, "worker", "--no-register", "--port", str(port), "--model-path", checkpoint,
           "--limit-model-concurrency", str(args.streams), "--threads", str(threads)] + MODES[mode]
    if args.reuse_cache_bytes:
        cmd += ["--reuse-cache-bytes", str(args.reuse_cache_bytes)]
    if args.prefill_chunk:
        cmd += ["--prefill-chunk", str(args.prefill_chunk)]
    log = open(os.path.join(args.log_dir, f"batch-worker-{mode}.log"), "w")
    worker = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    row = {"mode": mode, "command": " ".join(shlex.quote(c) for c in cmd)}
    try:
        wait_ready(url, worker, args.timeout)
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.streams)]
        solo = []
        counters = [decode_counters(url)]
        for q in questions:
            print(f"batch: {mode}: alone: {q!r}", file=sys.stderr, flush=True)
            result = {}
            stream_answer(url, image_url, q, args.new_tokens, result)
            solo.append(result)
        counters.append(decode_counters(url))
        print(f"batch: {mode}: {args.streams} streams at once", file=sys.stderr, flush=True)
        together = [{} for _ in questions]
        clients = [threading.Thread(target=stream_answer, args=(url, image_url, q, args.new_tokens, r))
                   for q, r in zip(questions, together)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        counters.append(decode_counters(url))
        if args.stagger:
            print(f"batch: {mode}: {args.streams} streams joining {args.stagger} s apart", file=sys.stderr, flush=True)
            staggered = run_staggered(url, image_url, questions, args.new_tokens, args.stagger)
            row["staggered_own_rates"] = own_rates(staggered)
            row["staggered_same_text"] = sum(a["text"] == b["text"] for a, b in zip(solo, staggered))
        if args.constrained:
            print(f"batch: {mode}: under a JSON schema, alone then {args.streams} at once", file=sys.stderr,
                  flush=True)
            row["constrained_alone"] = constraint_share(url, image_url, questions[:1], args.new_tokens)
            row["constrained_together"] = constraint_share(url, image_url, questions, args.new_tokens)
        errors = [r["error"] for r in solo + together if "error" in r]
        if errors or any(not r["arrivals"] for r in solo + together):
            row["error"] = errors[0] if errors else "an answer without text"
            return row
        solo_rates = [solo_rate(r) for r in solo]
        rate, window = together_rate(together)
        solo_mean = statistics.mean(x for x in solo_rates if x) if any(solo_rates) else None
        solo_steps, together_steps = step_rate(counters[0], counters[1]), step_rate(counters[1], counters[2])
        row.update(
            solo_step_tokens_per_s=solo_steps,
            together_step_tokens_per_s=together_steps,
            step_gain=together_steps / solo_steps if solo_steps and together_steps else None,
            solo_tokens_per_s=solo_mean,
            together_tokens_per_s=rate,
            together_window_s=window,
            gain=rate / solo_mean if rate and solo_mean else None,
            same_text=sum(a["text"] == b["text"] for a, b in zip(solo, together)),
            streams=args.streams,
            together_wall_s=max(r["arrivals"][-1] for r in together) - min(r["sent"] for r in together),
            solo_wall_s=sum(r["arrivals"][-1] - r["sent"] for r in solo),
            # The first solo request encodes the image and prefills everything; with the reuse cache
            # on, the later ones (same image, new question) reuse the features and the prompt's start.
            solo_ttft_first_s=solo[0]["arrivals"][0] - solo[0]["sent"],
            solo_ttft_later_s=statistics.median(r["arrivals"][0] - r["sent"] for r in solo[1:]),
        )
        if "staggered_own_rates" in row and solo_mean:
            row["staggered_gain"] = sum(row["staggered_own_rates"]) / solo_mean
        return row
    except RuntimeError as e:
        row["error"] = str(e)
        return row
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        log.close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="the tiny checkpoint of bench.py --small")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--cache", default=os.environ.get("ARCANA_BENCH_CACHE",
                                                     os.path.expanduser("~/.cache/arcana/bench")))
    p.add_argument("--arcana-src", default=None, help="for waterview.jpg (else a stand-in of its size)")
    p.add_argument("--image", default=None)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="default the physical cores")
    p.add_argument("--modes", default="exact,int8", help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--no-constrained", dest="constrained", action="store_false",
                   help="skip the rounds under a JSON schema")
    p.add_argument("--reuse-cache-bytes", type=int, default=0, help="the worker's reuse cache (0: off)")
    p.add_argument("--prefill-chunk", type=int, default=0, help="the worker's prefill chunk (0: whole prompts)")
    p.add_argument("--stagger", type=float, default=0.0,
                   help="also submit the streams this many seconds apart and sum their own decode rates")
    p.add_argument("--serve-binary", default=os.path.join(bench.REPO, "target", "release", "arcana-serve"))
    p.add_argument("--timeout", type=int, default=1800, help="seconds for a worker to load")
    p.add_argument("--out", default=os.path.join(bench.REPO, "bench-results", "batch.json"))
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        bench.fail(f"--modes: choose from {', '.join(MODES)}")
    if args.streams < 2 or args.new_tokens < 4:
        bench.fail("--streams must be at least 2 and --new-tokens at least 4")
    if not os.access(args.serve_binary, os.X_OK):
        bench.fail(f"no arcana-serve binary at {args.serve_binary}; build it with "
                   f"`cargo build --release --bin arcana-serve` (scripts/bench.sh --batch does)")
    threads = args.threads or bench.physical_cores()
    sizes = bench.SMALL if args.small else bench.FULL
    checkpoint = os.path.abspath(args.checkpoint) if args.checkpoint else bench.ensure_checkpoint(
        sizes, 0, args.cache)
    image, _ = bench.choose_image(args.image, args.arcana_src, args.cache)
    with open(image, "rb") as f:
        image_url = "data:image/jpeg;base64," + base64.b64encode(f.read()).decode()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    args.log_dir = os.path.dirname(os.path.abspath(args.out))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), RUST_LOG="warn")

    facts = bench.machine(threads)
    facts["loadavg_start"] = bench.loadavg()
    rows = [run_mode(m, args, checkpoint, image_url, threads, env) for m in modes]
    facts["loadavg_end"] = bench.loadavg()
    command = " ".join(["python parity/bench/batch.py"] + [shlex.quote(a) for a in (argv or sys.argv[1:])])

    print(f"\n## {args.streams} concurrent streams vs one at a time: `{command}`\n")
    print(f"- machine: {facts['cpu']} ({facts['cpu_features']}), {facts['physical_cores']} physical cores, "
          f"{threads} threads; commit {facts['commit']}; load average {facts['loadavg_start']} -> "
          f"{facts['loadavg_end']}")
    print(f"- checkpoint: {checkpoint}; image {os.path.basename(image)}; greedy, {args.new_tokens} new tokens\n")
    print(f"- worker: --reuse-cache-bytes {args.reuse_cache_bytes}, --prefill-chunk {args.prefill_chunk or 'none'}\n")
    print("| mode | decode tokens/s, alone | decode tokens/s, together | gain | same text as alone "
          "| time to first token, first / later (same image) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | failed: {r['error']} | | | | |")
        else:
            print(f"| {r['mode']} | {bench.fmt(r['solo_tokens_per_s'])} | {bench.fmt(r['together_tokens_per_s'])} "
                  f"| {bench.fmt(r['gain'])}x | {r['same_text']}/{r['streams']} "
                  f"| {bench.fmt(r['solo_ttft_first_s'])} s / {bench.fmt(r['solo_ttft_later_s'])} s "
                  f"({bench.fmt(r['solo_ttft_later_s'] / r['solo_ttft_first_s'])}x) |")
    table_head("The worker's decoding steps alone (its /metrics counters: tokens over the steps' seconds, "
               "prefill and the HTTP path left out), solo round and together round.",
               ["mode", "step tokens/s, alone", "step tokens/s, together", "gain"])
    for r in rows:
        if "error" not in r:
            print(f"| {r['mode']} | {bench.fmt(r['solo_step_tokens_per_s'])} "
                  f"| {bench.fmt(r['together_step_tokens_per_s'])} | {bench.fmt(r['step_gain'])}x |")
    if args.stagger:
        table_head(f"Joining {args.stagger} s apart: the sum of each stream's own decode rate (first to last "
                   f"token) over the solo rate.", ["mode", "own rates, tokens/s", "sum / solo", "same text as alone"])
        for r in rows:
            if "staggered_gain" in r:
                rates = ", ".join(bench.fmt(x) for x in r["staggered_own_rates"])
                print(f"| {r['mode']} | {rates} | {bench.fmt(r['staggered_gain'])}x "
                      f"| {r['staggered_same_text']}/{r['streams']} |")
    if args.constrained:
        table_head("Under a JSON schema: the constraints' time (masks and advances) as a share of the decoding "
                   "steps' time, from the worker's /metrics.",
                   ["mode", "rows", "step ms", "constraint us/token", "constraint share of a step"])
        for r in rows:
            for key, n in (("constrained_alone", 1), ("constrained_together", args.streams)):
                if key in r:
                    c = r[key]
                    print(f"| {r['mode']} | {n} | {bench.fmt(c['step_ms'])} | {bench.fmt(c['us_per_token'])} "
                          f"| {c['share'] * 100:.2f}% |")
    with open(args.out, "w") as f:
        json.dump({"command": command, "machine": facts, "checkpoint": checkpoint, "rows": rows}, f, indent=1)
    print(f"\nwritten: {args.out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
