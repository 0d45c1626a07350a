"""Admission: quota reservation, per-key windows."""
