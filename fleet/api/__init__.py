"""The fleet management API (FastAPI + SQLModel): organizations, API keys, devices, groups,
artifacts and the audit log. ``fleet.api.main.create_app`` builds the application; nothing
here opens a connection or reads the environment at import time.
"""
