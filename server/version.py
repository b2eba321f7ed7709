"""The server's version (health, OpenAPI)."""
VERSION = "0.1.0"
