"""Code that several steps share: settings, storage I/O, schemas, logging and the registry interface."""
