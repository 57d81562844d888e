"""The cloud API (FastAPI): datasets, jobs, the model registry and lineage; see :mod:`.main`."""
