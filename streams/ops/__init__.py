"""The worker's operational surface: health, lag, metrics, drift, the web views and their keys."""
