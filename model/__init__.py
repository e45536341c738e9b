"""Model library: prototxt -> JAX net, layers, solver (optax), snapshots, training loop, zoo.

Never imports Prefect: tasks/ wraps this package.
"""
