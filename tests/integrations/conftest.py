"""The served store of the client tests (`served`), for the integrations too."""

from tests.client.conftest import client_store, served, store_client  # noqa: F401
