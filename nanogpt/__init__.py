"""The library behind the commands at the top level: optimizers, parallelism, checkpoints, tokenizers, data loading,
post-training objectives, scoring and the evaluation tasks. Nothing here is run directly."""
