"""The worker process around a servicer: engine start, calibration, heartbeat, drain."""
