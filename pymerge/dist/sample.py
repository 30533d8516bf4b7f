"""A digest of a few bytes of each checkpoint, which ranks compare to read the same files (the sharded pool, torchrun
merges). Its own module, of hashlib only: the disk merge imports it before it streams anything."""
import hashlib
from typing import Callable, Iterable

SAMPLED_TENSORS = 64  # tensors sampled per checkpoint: a page read each from a file, spread over the names


def values_sample(names: Iterable[str], head: Callable[[str], bytes]) -> int:
    """A 62-bit digest of a few bytes (head(name): a torchrun merge's 64 at the start, middle and end of each; a
    sharded pool's first and last 16 values) of up to SAMPLED_TENSORS of a checkpoint's tensors, spread over its
    sorted names: ranks compare what each file holds, not its path (node-local copies live elsewhere; a stale copy
    on one node merged that rank's share from it, silently). Files that differ only outside the sampled bytes go
    unseen: reading them whole would cost a merge's reads."""
    names = sorted(names)
    digest = hashlib.blake2b(digest_size=8)
    for n in names[::max(1, -(-len(names) // SAMPLED_TENSORS))]:
        digest.update(n.encode("utf-8", "surrogatepass") + b"\0" + head(n))
    return int.from_bytes(digest.digest(), "little") >> 2
