"""Pure domain logic: money, catalog, orders. No I/O, no frameworks."""
