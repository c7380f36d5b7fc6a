"""Pipeline stages: each is run(cfg, ctx) -> metrics, usable without Ray."""
