"""Byte sizes written by people: one parser for the CLI (--out-shard-size, --chunk-size), the search
config and the pool (memory_budget), so a size means the same everywhere; and one way to write
a size back (format_size).

    parse_size("5GB") == 5_000_000_000      decimal units: k/kb, m/mb, g/gb, t/tb (powers of 1000)
    parse_size("1.5GiB") == 1_610_612_736   binary units: kib, mib, gib, tib (powers of 1024)
    parse_size("5B") == 5_000_000_000       a bare "b" is a billion, as in mergekit's --out-shard-size
    parse_size("2e9") == parse_size(2e9) == 2_000_000_000   plain numbers are bytes

Case, spaces and "_" are ignored; a fraction of a byte is dropped. Anything else (garbage,
negatives, non-finite or absurd sizes) is an InputError naming the setting.
"""
import math
import os
import re
from decimal import Decimal, InvalidOperation

from pymerge.errors import InputError, short

# mergekit's parse_kmb reads k/m/b as thousand/million/billion: "5B" is 5e9 there, and here.
UNITS = {"": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "b": 10**9, "g": 10**9, "gb": 10**9,
         "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
MIN_CHUNK_BYTES = 1 << 20  # the floor of --chunk-size (run_merge and the CLI)
MAX_BYTES = 1 << 60  # 1 EiB: larger is a typo, and would overflow the int64 sizes of the kernels
_NUMBER = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(e[+-]?\d+)?\s*([a-z]*)")
_HINT = "use bytes or a unit like 500MB, 5GB, 1.5GiB"


def parse_size(value, what: str = "size", minimum: int = 1, zero: bool = False) -> int:
    """Bytes from an int, a float or a string such as '5GB', '512MiB', '2e9', '5B' (see above); with
    zero=True an exact 0 too (--out-shard-size 0: one file), never a fraction of a byte below minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputError(f"{what}: expected a number of bytes or a string like 8GB, got {short(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{what}: {value} is not a size ({_HINT})")
    # Decimal, not float: '1e400' or a 400-digit number is an error here, not an OverflowError.
    n = _parse_text(value, what) if isinstance(value, str) else Decimal(value)
    if n < minimum and not (zero and n == 0):
        raise InputError(f"{what}: {short(value)} is below the minimum of {minimum} byte(s)")
    if n > MAX_BYTES:
        raise InputError(f"{what}: {short(value)} is more than {MAX_BYTES} bytes (1 EiB)")
    return int(n)


def _parse_text(text: str, what: str) -> Decimal:
    s = text.strip().lower().replace("_", "")
    m = _NUMBER.fullmatch(s)
    if not m or m.group(3) not in UNITS:
        raise InputError(f"{what}: {short(text)} is not a size ({_HINT})")
    try:
        number = Decimal(m.group(1) + (m.group(2) or ""))
    except InvalidOperation:  # an exponent of 19 or more digits is past what Decimal holds
        raise InputError(f"{what}: {short(text)} is not a size ({_HINT})") from None
    return number * UNITS[m.group(3)] if number.adjusted() < 100 else number  # 1e999999: huge already


def format_size(nbytes: float) -> str:
    """Bytes as people read them, in decimal units with two decimals ("1.05 GB", "45.00 MB", "512 bytes"): one
    format for every message that states a size (free space, pool residency, bench memory). Two decimals, so
    that a need and the free space beside it ("needs 1.05 GB but only 1.00 GB are free") differ where they do."""
    if nbytes < 1000:
        n = int(nbytes)
        return f"{n} byte{'' if n == 1 else 's'}"  # not "B": a size written "5B" reads as 5e9 (mergekit)
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if round(nbytes / scale, 2) >= 1:  # (999,999 bytes is 1.00 MB, not 1000.00 KB)
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes / 1e3:.2f} KB"


def free_memory(device) -> int:
    """Bytes a new allocation on `device` ("cpu", "cuda", a torch.device) can take: the GPU's free memory, or
    host_available()."""
    import torch
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_available()


def host_available() -> int:
    """Bytes of memory this machine can give without swapping (Linux's MemAvailable; free pages elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:  # (no locale's: EncodingWarning under -X dev checks)
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
