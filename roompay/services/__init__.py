"""Use cases: each combines domain rules, the store, providers and the device link
inside explicit transactions."""
