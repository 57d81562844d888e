"""The data loop's cloud side: ingestion of captured samples and drift sketches, drift
monitoring and alerts, and capture-policy delivery (issue #6; docs/dataloop.md).

Errors are :mod:`cloud.errors` classes, plus one for the broker::

    CloudError
    └── BrokerUnavailableError (503, exit 1): no broker configured, or it refused or timed out
"""

from __future__ import annotations

from cloud.errors import CloudError


class BrokerUnavailableError(CloudError):
    """The MQTT broker is not configured, refused us, or did not answer in time."""

    http_status = 503
