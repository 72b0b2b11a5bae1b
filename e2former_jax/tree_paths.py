"""Names of the leaves of a parameter tree: how checkpoints, the optimizer's groups and reports spell a path."""


def key_name(key) -> str:
  """One ``jax.tree_util`` path entry as text (dict key, attribute name or sequence index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_name(path) -> str:
  """'blocks/0/attention/query/left/kernel' from a ``jax.tree_util`` key path (a trailing ``/value`` of an
  ``nnx`` variable dropped)."""
  name = "/".join(key_name(k) for k in path)
  return name[: -len("/value")] if name.endswith("/value") else name
