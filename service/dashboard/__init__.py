"""The dashboard: HTML pages over the API's data (routes, page contexts, charts, templates)."""
