"""One module per report section; each has render(compared) -> HTML ("" without data)."""
