"""Answering alerts: a person's verdict on an alert (``verdicts``) and what it changes (``apply``)."""
