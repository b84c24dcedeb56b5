"""The training loop (`loop.fit`), objectives, model stacks, runtime, checkpoints, tracking, distributed runs, and `evaluate.predict`."""
