"""``kubeque demo``: runs a small real application through kubeque end to end and checks the result.

The click command is :data:`kubeque.demo.command.demo`; the application it runs
lives in ``examples/demo/demo_app``.
"""
