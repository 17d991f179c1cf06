"""The wire protocol between orchestrator and workers: job and result messages, queues, weights store.

Nothing in this package imports torch, so the worker's parent process can use it before
it forks pool children.
"""
