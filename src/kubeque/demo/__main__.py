"""``python -m kubeque.demo``: the same as ``kubeque demo``."""

from .command import demo

if __name__ == "__main__":
    demo(prog_name="kubeque demo")
