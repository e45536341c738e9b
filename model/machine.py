"""The host CPU as the kernels see it: its model, the ISA extensions that decide which kernel
is fastest, and a fingerprint of both (with the core count and the XLA build) that keys the
choices measured on this machine (model/autotune.py) and heads every benchmark's output
(benchmarks/common.py).

The project's machines have changed CPU family between sessions (AMD Zen 3 with AVX2, Intel
Xeon with AVX-512 and AMX, AMD Zen 4 with AVX-512 and no AMX): nothing measured on one may be
assumed on another, so everything measured is stored under this fingerprint.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from data.host import available_cores

CPUINFO = Path("/proc/cpuinfo")
# Extensions that change which kernel wins (vector width, FMA, bf16/int8 dot products, matrix
# tiles), x86 and Arm; the rest of /proc/cpuinfo's flags are left out of headers and keys.
ISA_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c",
    "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "avx512vbmi", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
    "asimd", "asimddp", "sve", "sve2", "bf16", "i8mm",
)


@dataclass(frozen=True)
class CpuInfo:
    model: str            # "AMD EPYC", "Intel(R) Xeon(R) Processor", ...
    vendor: str           # "AuthenticAMD", "GenuineIntel", "" where not reported
    family: str           # x86 cpu family / model numbers ("" elsewhere): Zen 3 is 25/1,
    model_number: str     # Zen 4 25/17, so they tell apart CPUs a VM names alike
    isa: tuple[str, ...]  # the ISA_FLAGS present, in ISA_FLAGS order
    cores: int            # cores this process may run on

    def describe(self) -> str:
        """One line: `AMD EPYC (AuthenticAMD family 25 model 17), 2 cores; ISA avx2 fma ...`."""
        ident = " ".join(p for p in (self.vendor, self.family and f"family {self.family}",
                                     self.model_number and f"model {self.model_number}") if p)
        amx = "" if any(f.startswith("amx") for f in self.isa) else "; no AMX"
        return (f"{self.model}{f' ({ident})' if ident else ''}, {self.cores} cores; "
                f"ISA {' '.join(self.isa) or 'baseline'}{amx if self.vendor else ''}")


def _parse_cpuinfo(text: str) -> dict[str, str]:
    """The first processor's `key: value` lines (every core repeats them)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    try:
        fields = _parse_cpuinfo(CPUINFO.read_text())
    except OSError:
        fields = {}
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return CpuInfo(
        model=fields.get("model name") or platform.processor() or platform.machine(),
        vendor=fields.get("vendor_id", ""),
        family=fields.get("cpu family", ""),
        model_number=fields.get("model", ""),
        isa=tuple(f for f in ISA_FLAGS if f in flags),
        cores=available_cores(),
    )


def fingerprint() -> str:
    """What a measured kernel choice depends on: the CPU, its ISA, the cores, the XLA build
    and flags. Choices stored under another fingerprint are never used here."""
    import jax
    import jaxlib

    return (f"{cpu_info().describe()} | jax {jax.__version__} jaxlib {jaxlib.__version__} | "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")


__all__ = ["CpuInfo", "ISA_FLAGS", "cpu_info", "fingerprint"]
