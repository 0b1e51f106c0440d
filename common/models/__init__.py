"""Networks fedscan trains, chosen by name through the registry."""
