"""Ray Tune search over sparsity schedules, task sampling and task weights; each trial a DeepSpeed job."""
