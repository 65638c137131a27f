"""The training loop: run set-up and resume, objectives, the step's forward, checkpoints,
distributed helpers, logging."""
