"""``python -m e2former_jax``: the environment report of ``e2former-info``."""

from e2former_jax.info import main

if __name__ == "__main__":
  raise SystemExit(main())
