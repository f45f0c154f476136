"""One module per bench suite; each returns a SuiteResult with rows (table) and data (JSON)."""
