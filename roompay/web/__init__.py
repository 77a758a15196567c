"""HTTP: the JSON API, provider notify endpoints, guest pages and operations endpoints."""
