"""Where a reference was computed: the facts that decide which CPU kernels ran.

Bit-identity is a property of one machine and one kernel path; these facts are stored in every reference
file's metadata (keys `machine.*`) and printed by `arcana-parity` for the machine that runs it.
"""
import os
import re

import torch

# Settings that change the kernel path; recorded when set.
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "OMP_NUM_THREADS",
              "MKL_NUM_THREADS")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def cpu_features():
    """The vector extensions that decide ATen's and MKL's dispatch, as the kernel sees them."""
    wanted = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "avx")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return " ".join(w for w in wanted if w in flags)
    except OSError:
        pass
    return "unknown"


def _config_field(pattern, text):
    m = re.search(pattern, text)
    return m.group(1).strip() if m else "unknown"


def machine():
    """The machine and kernel path, as `machine.<field>` -> string."""
    config = torch.__config__.show()
    facts = {
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "aten_cpu_capability": _config_field(r"CPU capability usage: ([^\n]+)", config),
        "torch": torch.__version__.split("+")[0],
        "mkl": _config_field(r"Math Kernel Library Version ([^\n]+?) for", config),
        "onednn": _config_field(r"MKL-DNN v(\S+)", config),
        "threads": str(torch.get_num_threads()),
    }
    for var in KERNEL_ENV:
        if os.environ.get(var):
            facts[f"env.{var}"] = os.environ[var]
    return {f"machine.{k}": v for k, v in facts.items()}


if __name__ == "__main__":
    for k, v in machine().items():
        print(f"{k}: {v}")
