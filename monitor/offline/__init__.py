"""Evaluation on labelled data sets: the DCASE layout, the official figures, reports."""
