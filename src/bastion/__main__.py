"""``python -m bastion`` runs the `bastion` command (useful from a source checkout: PYTHONPATH=src)."""

from bastion.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
