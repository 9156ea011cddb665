from tests.engine_fixtures import docker_engine, target  # noqa: F401 - fixtures
