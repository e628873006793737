"""Telemetry of the stages: Prometheus metrics of one stage run (stage.py: StageTelemetry), pushed to a Pushgateway
(push.py) or served at /metrics, with the gateway, port and run id a run uses (settings.py)."""
