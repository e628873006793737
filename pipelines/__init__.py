"""The ddil Kubeflow pipeline (ddil.py) and its compiled IR (ddil.yaml)."""
