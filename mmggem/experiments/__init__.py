"""Experiments on top of training: the pooling ablation and its statistics, notebook analysis, the demo."""
