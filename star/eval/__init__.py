"""Evaluation: records, the resumable runner, and the report (table and plots)."""
