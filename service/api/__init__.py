"""The REST API (FastAPI): thin routes over the domain in service.core and the tables in service.db."""
