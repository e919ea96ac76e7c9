"""Stand-in for the WebUI's `modules` package; `calls` records what the extension did."""
calls: list = []
