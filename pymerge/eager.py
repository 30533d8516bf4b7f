"""Merge calls run eagerly inside a torch.compile'd function: a user's step that merges a candidate and then scores
it is traced up to the merge, which runs as a graph break (traced, it died in Dynamo's fake tensors: the pool takes
locks and writes through raw pointers; an audit)."""
import functools
import sys


def eager_when_compiled(fn):
    """fn under torch.compiler.disable where torch._dynamo is loaded (whoever compiles has loaded it), fn itself
    elsewhere: decorating with torch.compiler.disable loads it, 1.3 s more for every `import pymerge` (a review)."""
    disabled = []

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dynamo = sys.modules.get("torch._dynamo")
        if dynamo is None or not hasattr(dynamo, "disable"):  # (not loaded, or still being loaded)
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(dynamo.disable(fn))
        return disabled[0](*args, **kwargs)
    return wrapper
