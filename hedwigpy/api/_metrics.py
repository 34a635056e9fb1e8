"""`GET /metrics`: the collector's page in the Prometheus text format (`hedwigpy.metrics`).

Authorized like every route but the probes (`hedwigpy.api._auth`): a scraper sends the API key as
`Authorization: Bearer KEY` (Prometheus: `authorization: {credentials: KEY}`), or scrapes over loopback
when no keys are configured.
"""

from __future__ import annotations

from quart import Response
from quart_trio import QuartTrio

from ..metrics import CONTENT_TYPE, MetricsCollector


def register_metrics(app: QuartTrio, collector: MetricsCollector) -> None:
    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(collector.render(), status=200, content_type=CONTENT_TYPE)
