"""The terminal UI: what `seal tui` and the read-only views (`seal history`, `show`,
`passages`, `candidates`, `forgetting`) show. It only reads the store."""
