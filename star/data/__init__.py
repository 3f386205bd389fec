"""Evaluation and training data: the seeded scene generator, easy-VQA from its wheel, VQA answer scoring."""
