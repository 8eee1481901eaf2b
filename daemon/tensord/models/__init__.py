"""Model registry: what the daemon serves, each model's signature, and how it is loaded."""
