"""Serving: `predictor` (pure two-stage inference), `service` (the BentoML service) and `web/`
(the upload page the service serves)."""
