"""Built-in merge methods: importing a module registers its methods (see base.register)."""
import pymerge.methods.linear  # noqa: F401  linear, task_arithmetic
import pymerge.methods.model_stock  # noqa: F401
import pymerge.methods.passthrough  # noqa: F401
import pymerge.methods.slerp  # noqa: F401  slerp, nuslerp
import pymerge.methods.task_vectors  # noqa: F401  ties, dare_*, breadcrumbs*, della*
