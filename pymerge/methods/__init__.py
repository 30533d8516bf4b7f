"""Built-in merge methods: importing a module registers its methods (see base.register)."""
import pymerge.methods.linear  # noqa: F401
