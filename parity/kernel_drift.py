#!/usr/bin/env python3
"""How far the PyTorch reference moves between CPU kernel paths, per stage.

Exports every committed parity fixture again under each kernel path (environment settings that change
which ATen / MKL kernels run, or how many threads sum), then compares every pair of exports, the committed
fixtures included, tensor by tensor. Prints, per stage, the largest max|diff| / max|reference| and the
smallest cosine seen over all pairs, presets and cases, and whether the integer tensors (inputs, greedy
ids) stayed equal. `--write-tolerances` turns the measurement into tests/fixtures/parity/tolerances.json
(measured values times `--margin`).

    python parity/kernel_drift.py [--json out.json] [--write-tolerances] [--margin 4]
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

import export  # noqa: E402
import provenance  # noqa: E402

# Settings that pick other kernels on one machine. ATen's own dispatch (vectorised elementwise, softmax,
# norms) follows ATEN_CPU_CAPABILITY; MKL's GEMMs follow MKL_ENABLE_INSTRUCTIONS; the thread count changes
# how reductions are split.
KERNEL_PATHS = {
    "as-is": {},
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
    "aten-avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
    "mkl-avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "mkl-sse42": {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "1-thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "aten-default+mkl-avx2+1-thread": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                                       "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
}


def export_under(path_env, root):
    env = dict(os.environ, PYTHONWARNINGS="ignore", **path_env)
    subprocess.run([sys.executable, os.path.join(HERE, "export.py"), "fixtures", "--root", root],
                   env=env, check=True, stdout=subprocess.DEVNULL)


def reference_files(root):
    for preset in export.FIXTURE_PRESETS:
        pdir = os.path.join(root, preset)
        for f in sorted(os.listdir(pdir)):
            if f.startswith("reference") and f.endswith(".safetensors"):
                yield f"{preset}/{f}", os.path.join(pdir, f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paths", default=",".join(KERNEL_PATHS), help="comma-separated kernel paths to export")
    p.add_argument("--json", default=None, help="write the measurement here")
    p.add_argument("--write-tolerances", action="store_true")
    p.add_argument("--margin", type=float, default=4.0)
    args = p.parse_args(argv)

    roots = {"committed": export.DEFAULT_FIXTURES}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.paths.split(","):
            root = os.path.join(tmp, name)
            print(f"exporting under {name} {KERNEL_PATHS[name]}", file=sys.stderr)
            export_under(KERNEL_PATHS[name], root)
            roots[name] = root
        files = {name: dict(reference_files(root)) for name, root in roots.items()}
        per_stage = {}
        integer_mismatches = []
        for (na, fa), (nb, fb) in itertools.combinations(files.items(), 2):
            for rel_name in fa:
                with safe_open(fa[rel_name], "pt") as x, safe_open(fb[rel_name], "pt") as y:
                    for key in x.keys():
                        ta, tb = x.get_tensor(key), y.get_tensor(key)
                        if not ta.is_floating_point():
                            if not torch.equal(ta, tb):
                                integer_mismatches.append(f"{na} vs {nb}: {rel_name} {key}")
                            continue
                        diff, rel, cos = export._drift(ta, tb)
                        stage = export.tolerance_stage(key)
                        s = per_stage.setdefault(stage, {"max_abs": 0.0, "max_rel": 0.0, "min_cosine": 1.0,
                                                         "worst": ""})
                        if rel > s["max_rel"]:
                            s["worst"] = f"{na} vs {nb}: {rel_name} {key}"
                        s["max_abs"] = max(s["max_abs"], diff)
                        s["max_rel"] = max(s["max_rel"], rel)
                        s["min_cosine"] = min(s["min_cosine"], cos)

    order = sorted(per_stage, key=lambda n: export.STAGE_PREFIXES.index(n) if n in export.STAGE_PREFIXES else 99)
    print(f"{'stage':<22} {'max|diff|':>11} {'max rel':>11} {'1 - min cos':>12}  worst pair")
    for stage in order:
        s = per_stage[stage]
        print(f"{stage:<22} {s['max_abs']:>11.3e} {s['max_rel']:>11.3e} {1 - s['min_cosine']:>12.3e}  {s['worst']}")
    print("integer tensors (inputs, greedy ids): " +
          ("equal on every path" if not integer_mismatches else "DIFFER: " + "; ".join(integer_mismatches)))
    machine = provenance.machine()
    result = {"machine": machine, "paths": {n: KERNEL_PATHS.get(n, {}) for n in roots}, "stages": per_stage,
              "integer_mismatches": integer_mismatches}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.write_tolerances:
        export.write_tolerances(per_stage, args.margin, machine, " ".join(["python parity/kernel_drift.py"] +
                                                                            (argv or sys.argv[1:])))
    return 1 if integer_mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
