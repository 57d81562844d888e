"""One router per resource of the cloud API."""
