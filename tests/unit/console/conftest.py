from tests.unit.identity.conftest import client, settings  # noqa: F401  (shared fixtures)
