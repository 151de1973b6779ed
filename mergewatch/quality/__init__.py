"""Merge quality on real tasks, offline: fine-tuned experts of real pre-trained models and their scores."""
