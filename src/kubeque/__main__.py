"""``python -m kubeque``: the same command as ``kubeque``."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="kubeque")
