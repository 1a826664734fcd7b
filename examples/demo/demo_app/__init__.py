"""The application that ``kubeque demo`` runs: a QueueManager and its handlers in ``demo_app.tasks``."""
