"""Decode worker: pulls handed-off KV, joins the running batch, streams tokens."""
